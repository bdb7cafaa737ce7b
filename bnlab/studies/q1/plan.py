"""Q1's plan: the arms it trains, the claims it judges and the thresholds stated up front.

Every threshold below is fixed before any run is seen (SPEC "Evidence"): a difference
counts only beyond its minimum effect, and a generalization gap is compared only between
networks that fit their training images equally well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAME = "q1"
TITLE = "Q1 — Is BN a regularizer?"

# ---- thresholds, stated before the data ------------------------------------------------------
MIN_GAP_EFFECT = 0.02   # a regularizer must move the eval-mode accuracy gap by >= 2 points
MIN_ACC_EFFECT = 0.01   # a test-accuracy difference that matters: >= 1 point
FIT_TOLERANCE = 0.05    # fits are "equal" when the 95% interval of the paired difference of
                        # eval-mode train accuracy lies inside +-5 points (stats.within)

# ---- the noise measurement ------------------------------------------------------------------
BATCH_SIZES = (4, 8, 16, 32, 64, 128, 256)  # of the noise measurement, clamped to the pool
NOISE_DRAWS = 2            # batch compositions (or dropout masks) per image and batch size
NOISE_POOL_CAP = 8192      # images of the training subset the noise is measured on, at most
THEORY_SLOPE = -0.5        # noise ~ B^(-1/2)
SLOPE_TOLERANCE = 0.15     # "roughly 1/sqrt(B)": the fitted slope within -0.5 +- this
CHUNK_IMAGES = 512         # images per forward call of the noise measurement

# ---- the ghost-batch experiment -------------------------------------------------------------
GHOST_DIVISORS = (8,)      # virtual batch = training batch // divisor (>= 2): 8 of 64
GHOST_SKIPPED_AT = ("quick",)  # scales without it: a ghost run (bnlab's BN, one slice at a
                               # time) costs about 2 PyTorch-BN runs, which would take Q1's
                               # quick budget from ~150 s to ~270 s

POST_CLAIM = ("BN regularizes as a side effect: like dropout it adds noise to training, "
              "and with BN (case b) the model reached a higher test accuracy with a lower "
              "train accuracy than without (case a), so BN \"really does help with "
              "generalization\".")

LITERATURE = (
    "Ioffe & Szegedy (2015, Sec. 4.2.1) removed dropout from their BN-Inception and reduced "
    "the L2 weight regularization by a factor of 5, reporting that BN's regularizing effect "
    "made them unnecessary at ImageNet scale. Hoffer, Hubara & Soudry (2017, \"Train longer, "
    "generalize better\") computed BN's statistics over ghost batches of 128 images inside "
    "large batches and recovered much of large-batch training's generalization loss, so the "
    "size of the batch BN sees sets part of its effect. Luo et al. (ICLR 2019, \"Towards "
    "understanding regularization in batch normalization\") decompose BN into population "
    "normalization plus an explicit regularizer whose strength grows as the batch shrinks. "
    "Bjorck et al. (NeurIPS 2018) find that much of BN's benefit to generalization comes "
    "through the larger learning rates it allows, which is why Q1 compares each network at "
    "its own tuned rate as well as at a common one."
)


@dataclass(frozen=True)
class Arm:
    """One configuration of the gap experiment, trained on ``seeds``: ``key`` names it in
    summary.json, ``rate`` says which learning rate it runs at ("tuned": the network's own,
    "common": the scale's), ``fields`` are its :class:`~bnlab.train.TrainConfig` overrides
    (norm, dropout, lr, ghost options)."""

    key: str
    label: str
    rate: str
    lr: float
    seeds: tuple[int, ...]
    fields: dict[str, Any] = field(default_factory=dict)

    def run_name(self, seed: int) -> str:
        """``<config>-lr<lr>/seed<s>``: named by what is trained, so two arms with the same
        config (a network whose tuned rate is the common one) share their runs."""
        tag = "-".join(f"{k}{v}" for k, v in sorted(self.fields.items()) if k != "lr")
        return f"{tag}-lr{self.lr:.3g}/seed{seed}"


def ghost_sizes(batch_size: int) -> list[int]:
    """The virtual batch sizes of the ghost experiment at a training batch size: the batch
    over each of :data:`GHOST_DIVISORS`, at least 2 and below the batch (so each differs
    from BN).

    >>> ghost_sizes(64), ghost_sizes(8), ghost_sizes(2)
    ([8], [2], [])
    """
    sizes = {max(2, batch_size // divisor) for divisor in GHOST_DIVISORS}
    return sorted(size for size in sizes if size < batch_size)


def plan_arms(rates: dict[str, dict[str, float]], batch_size: int, seeds: list[int],
              headline_seeds: list[int], ghost: bool = True) -> list[Arm]:
    """The arms of Q1 for tuned and common rates ``rates[network][rate]`` (network "none" or
    "bn"): both networks at their own tuned rate (``headline_seeds``: the headline claim)
    and at the common rate; BN + dropout at BN's tuned rate (dropout is the positive control
    and the network on which BN's and dropout's noise are measured together); ghost BN at
    each :func:`ghost_sizes` at BN's tuned rate (unless ``ghost`` is False)."""
    arms = []
    for rate, arm_seeds in (("tuned", headline_seeds), ("common", seeds)):
        arms += [Arm(f"none@{rate}", f"no BN, {rate} lr", rate, rates["none"][rate],
                     tuple(arm_seeds), {"norm": "none", "dropout": False}),
                 Arm(f"bn@{rate}", f"BN, {rate} lr", rate, rates["bn"][rate],
                     tuple(arm_seeds), {"norm": "torch", "dropout": False})]
    bn_lr = rates["bn"]["tuned"]
    arms.append(Arm("bn_dropout", "BN + dropout, BN's tuned lr", "tuned", bn_lr, tuple(seeds),
                    {"norm": "torch", "dropout": True}))
    for size in ghost_sizes(batch_size) if ghost else []:
        arms.append(Arm(f"ghost{size}", f"ghost BN, virtual batch {size}, BN's tuned lr",
                        "tuned", bn_lr, tuple(seeds),
                        {"norm": "bnlab", "norm_kind": "ghost", "virtual_batch_size": size,
                         "dropout": False}))
    return arms
