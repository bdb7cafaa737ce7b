"""The field's answers to BN's drawbacks, hand-derived like BN itself (one idea per module).

- :mod:`bnlab.variants.renorm`    — Batch Renormalization (Ioffe 2017): batch statistics
  corrected toward the running ones by ``r`` and ``d``, for small or non-i.i.d. batches
- :mod:`bnlab.variants.ghost`     — ghost batch normalization (Hoffer et al. 2017):
  statistics over virtual batches inside each batch
- :mod:`bnlab.variants.groupnorm` — GroupNorm (Wu & He 2018): BN's math over the channels
  of a group of one sample, independent of the batch
- :mod:`bnlab.variants.precise`   — population statistics ("precise BN", Wu & Johnson 2021):
  running statistics recomputed as the exact average over many batches

Each module holds the math (pure functions: forward, the closed-form backward with its
derivation, the running-statistics rule) and the ``torch.nn.Module`` built on it; the
manual engine's layers (:mod:`bnlab.manual.norms`) call the same functions. Everything is
re-exported from :mod:`bnlab.nn`.
"""

from bnlab.variants.ghost import (
    GhostBatchNorm2d,
    GhostBatchNormFunction,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    ghost_batch_norm_step,
)
from bnlab.variants.groupnorm import (
    GroupNorm,
    GroupNormFunction,
    GroupNormSaved,
    group_norm_backward,
    group_norm_forward,
)
from bnlab.variants.precise import precise_bn
from bnlab.variants.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormFunction,
    BatchRenormSaved,
    batch_renorm_backward,
    batch_renorm_forward,
    batch_renorm_step,
    renorm_limits,
    update_renorm_running_stats,
)

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormFunction",
    "BatchRenormSaved",
    "GhostBatchNorm2d",
    "GhostBatchNormFunction",
    "GroupNorm",
    "GroupNormFunction",
    "GroupNormSaved",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "batch_renorm_step",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "ghost_batch_norm_step",
    "group_norm_backward",
    "group_norm_forward",
    "precise_bn",
    "renorm_limits",
    "update_renorm_running_stats",
]
