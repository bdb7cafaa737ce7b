r"""Softmax cross-entropy with its gradient: the first step of the manual backward pass.

Shape legend::

    logits, dlogits : (N, K)   N examples, K classes
    target          : (N,)     class indices in [0, K), int64
    loss            : ()       mean over the batch

Usage::

    >>> import torch
    >>> from bnlab.manual.loss import softmax_cross_entropy
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> loss, dlogits = softmax_cross_entropy(logits, torch.tensor([0, 1]))
    >>> round(loss.item(), 4)
    0.1269
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["softmax_cross_entropy"]


def softmax_cross_entropy(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, *, mean_gradient: bool = True
) -> tuple[Tensor, Tensor]:
    r"""Mean softmax cross-entropy over the batch and its gradient with respect to the logits.

    With ``z = logits``, the target distribution ``q`` (one-hot, or with label smoothing
    ``eps``: ``q = (1 - eps) onehot(t) + eps / K``, as
    ``torch.nn.functional.cross_entropy(label_smoothing=eps)``) and

        log p_k = z_k - logsumexp(z)          (stable: logsumexp(z) = M + log sum exp(z - M),
                                               M = max_k z_k, so no exp overflows)
        L       = -(1/N) sum_n sum_k q_{n,k} log p_{n,k}

    the gradient is (since d log p_k / d z_j = [j = k] - p_j and sum_k q_k = 1)::

        dL/dz_{n,j} = (1/N) (p_{n,j} - q_{n,j})

    ``mean_gradient=False`` returns ``dlogits = p - q`` without the 1/N, the gradient of
    the *summed* loss, N times the gradient of the loss returned (which is still the batch
    mean): half of the post's case c "loss" error.

    Returns ``(loss, dlogits)``: ``loss`` a 0-d tensor of the logits' dtype, ``dlogits``
    shaped like ``logits``. Logits in float16/bfloat16 (a mixed-precision network) are
    computed in float32, as ``torch.autocast`` does for ``cross_entropy``: ``loss`` is then
    float32 and ``dlogits`` is returned in the logits' dtype (the gradient of the cast).

    >>> loss, dz = softmax_cross_entropy(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
    >>> round(loss.item(), 4), abs(dz.sum().item()) < 1e-7   # log 10; the rows sum to 0
    (2.3026, True)
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (N, K), got {logits.dim()}D input")
    n, k = logits.shape
    if target.shape != (n,):
        raise ValueError(
            f"expected target of shape ({n},) for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise RuntimeError(f"expected target of dtype int64 (class indices), got {target.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if n == 0:
        raise ValueError("softmax_cross_entropy needs at least one example (got N = 0)")
    # checked on CPU only: elsewhere it would synchronize with the device every step (an
    # out-of-range index then fails in scatter_, as in torch's own kernels)
    if target.device.type == "cpu" and (int(target.min()) < 0 or int(target.max()) >= k):
        bad = int(target.min()) if int(target.min()) < 0 else int(target.max())
        raise IndexError(f"Target {bad} is out of bounds (expected class indices in [0, {k}))")

    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        in_dtype, logits = logits.dtype, logits.float()
    shifted = logits - logits.amax(1, keepdim=True)  # z - M
    log_p = shifted - shifted.exp().sum(1, keepdim=True).log()  # z - logsumexp(z)
    q = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1.0 - label_smoothing)
    if label_smoothing:
        q.add_(label_smoothing / k)
    loss = -(q * log_p).sum() / n
    dlogits = log_p.exp().sub_(q)  # p - q
    if mean_gradient:
        dlogits.div_(n)  # (p - q) / N
    if low_precision:
        dlogits = dlogits.to(in_dtype)
    return loss, dlogits
