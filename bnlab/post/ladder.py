"""The ladder from the post's case b to its case c: one difference per step.

Under the ``post`` presets (``bnlab compare --preset post|post-quick``) these cases, run in
this order, change one thing each (the cases themselves are in :mod:`bnlab.cases`):

| step       | = the step above plus                                         |
|------------|---------------------------------------------------------------|
| b          | (TF autodiff → autograd; per-channel scale-only BN; Adam β2 0.9) |
| b-manual   | the manual engine and bnlab's BN (hand-written vs framework)  |
| b-act      | per-activation BN (statistics over the batch axis only)       |
| b-act-rule | the post's optimizer rule (whole-tensor-sum AMSGrad, no bias correction) |
| c          | the three gradient errors (ELU' = 2, pool not /4, loss not /N, /64) |
"""

from __future__ import annotations

__all__ = ["LADDER"]

LADDER: tuple[str, ...] = ("b", "b-manual", "b-act", "b-act-rule", "c")
