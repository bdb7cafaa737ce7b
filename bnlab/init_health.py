"""Is All-CNN-C's signal alive at initialization? Per-layer activation scale and dead logits.

A network without BN trains only if its forward signal survives its depth at init (He et
al. 2015, section 2.2): with PyTorch's default conv init (``Var[w] = 1/(3 fan_in)``) each
ReLU layer shrinks the second moment about 6x, the class scores of All-CNN-C barely depend
on the image, and behind the paper's final ReLU some class scores are exactly 0 for every
image, so they get no gradient. He's init (``Var[w] = 2/fan_in``) keeps the scale; BN
restores it at every layer whatever the init.

- :func:`init_health`: one network at init on a batch of images: :class:`InitHealth`.
- :func:`init_health_table`: the init options side by side (with and without BN) on real
  images of the embedded CIFAR-10 sample; what ``bnlab compare`` stores in
  ``init_health.json`` and the report shows.

    >>> from bnlab.init_health import init_health_table
    >>> rows = init_health_table(width=0.125, n_images=64)        # doctest: +SKIP
    >>> rows[0]["norm"], rows[0]["init"], rows[0]["dead_logit_fraction"]   # doctest: +SKIP
    ('none', 'kaiming', 0.0)
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from bnlab import data as bdata
from bnlab.models import AllCNNC

__all__ = ["MIN_SCALE_RATIO", "TABLE_OPTIONS", "InitHealth", "init_health", "init_health_table"]

MIN_SCALE_RATIO = 0.1  # last layer's activation scale ≥ this × the first's: the signal lives

# (norm, init scheme, final ReLU) of the table's rows: bnlab's default first, then each
# option alone, then the old default (PyTorch's init and the paper's final ReLU).
TABLE_OPTIONS = (
    ("none", "kaiming", False), ("none", "kaiming", True), ("none", "torch", False),
    ("none", "torch", True), ("torch", "kaiming", False), ("torch", "torch", True),
)


@dataclass(frozen=True)
class InitHealth:
    """One network's forward signal at initialization.

    ``layers``: ``conv1`` ... ``conv9``; ``scales``: per layer, the root mean square of the
    layer's output as the next layer sees it (after its BN and ReLU; conv9's: the class-score
    map before pooling, after the final ReLU if there is one), over every image, channel and
    position; ``dead_logit_fraction``: the fraction of classes whose logit is exactly 0 for
    every image (behind a ReLU: no gradient reaches that class's weights).
    """

    norm: str
    init: str
    final_relu: bool
    layers: tuple[str, ...]
    scales: tuple[float, ...]
    dead_logit_fraction: float

    @property
    def scale_ratio(self) -> float:
        """The last layer's activation scale over the first's (1: the scale is kept)."""
        return self.scales[-1] / self.scales[0] if self.scales[0] > 0 else 0.0

    @property
    def healthy(self) -> bool:
        """No dead logit and ``scale_ratio >= MIN_SCALE_RATIO``."""
        return self.dead_logit_fraction == 0.0 and self.scale_ratio >= MIN_SCALE_RATIO

    def to_json(self) -> dict:
        return {**asdict(self), "scale_ratio": self.scale_ratio, "healthy": self.healthy}


@torch.no_grad()
def init_health(
    images: Tensor,
    *,
    norm: str = "none",
    init: str = "kaiming",
    final_relu: bool = False,
    width: float = 1.0,
    seed: int = 0,
) -> InitHealth:
    """Measure :class:`InitHealth` of ``AllCNNC(norm, width, init_scheme=init, final_relu)``
    at initialization (weights drawn from ``torch.Generator().manual_seed(seed)``) on
    ``images``: float (N, 3, H, W), normalized as training sees them (H, W ≥ 9).

    BN, if any, uses the batch statistics (training mode, as the first step sees them); the
    measurement runs on a network of its own and changes nothing else.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}"
        )
    model = AllCNNC(norm=norm, width=width, in_channels=images.shape[1], init_scheme=init,
                    final_relu=final_relu, generator=torch.Generator().manual_seed(seed),
                    dtype=images.dtype)
    model.train()
    layers: list[str] = []
    scales: list[float] = []
    x = images
    for name, module in model.named_children():
        if (isinstance(module, nn.Conv2d) or name == "pool") and layers:
            scales.append(x.double().square().mean().sqrt().item())  # the layer before's
        if isinstance(module, nn.Conv2d):
            layers.append(name)
        x = module(x)
    dead = (x == 0).all(dim=0).double().mean().item()
    return InitHealth(norm, init, final_relu, tuple(layers), tuple(scales), dead)


def init_health_table(
    width: float = 1.0,
    seed: int = 0,
    n_images: int = 256,
    options: tuple[tuple[str, str, bool], ...] = TABLE_OPTIONS,
) -> list[dict]:
    """:func:`init_health` of each (norm, init, final ReLU) in ``options`` on the first
    ``n_images`` training images of bnlab's embedded CIFAR-10 sample (real images,
    normalized with the CIFAR-10 constants), as JSON rows (:meth:`InitHealth.to_json`).

    The rows depend on the arguments alone (the sample is fixed and the weights come from
    ``seed``), so a process computes each table once and hands out copies."""
    return copy.deepcopy(_init_health_rows(width, seed, n_images, tuple(options)))


@functools.lru_cache(maxsize=16)
def _init_health_rows(width: float, seed: int, n_images: int,
                      options: tuple[tuple[str, str, bool], ...]) -> list[dict]:
    sample = bdata.load_embedded_sample()
    if not 1 <= n_images <= sample.num_train:
        raise ValueError(f"n_images must be in [1, {sample.num_train}], got {n_images}")
    images = bdata.normalize(sample.train_images[:n_images], channels_last=False)
    return [init_health(images, norm=norm, init=init, final_relu=final_relu, width=width,
                        seed=seed).to_json()
            for norm, init, final_relu in options]
