r"""Layers of the manual engine: an explicit ``forward`` that keeps what its ``backward`` needs.

Shape legend::

    N  batch size         C  channels (C_in, C_out for a convolution)
    H, W  spatial size    K  classes
    x, y    : a layer's input and output;  dy = dL/dy arrives, dx = dL/dx leaves
    d<name> : the gradient of the loss L with respect to <name> (dweight, dbias, ...)

Every layer follows one protocol (:class:`Layer`)::

    y  = layer.forward(x, training)    # keeps what backward needs (references, no copies)
    dx = layer.backward(dy)            # fills layer.grads[name] for each parameter

``backward`` overwrites (never accumulates) ``layer.grads`` and must follow the
``forward`` whose result it differentiates. ``backward(dy, need_dx=False)`` skips the input
gradient where nothing upstream needs it (the first convolution of a network).

No autograd anywhere: the chain rule, every element-wise and reduction gradient is
written here; the convolution's input and weight gradients come from PyTorch's
convolution-backward primitive (``aten.convolution_backward``), its bias gradient is ours;
batch normalization's math is :mod:`bnlab.functional`'s.

Usage::

    >>> import torch
    >>> from bnlab.manual.layers import Conv2d, ReLU
    >>> conv, relu = Conv2d(3, 4, 3, padding=1), ReLU()
    >>> x = torch.randn(2, 3, 5, 5)
    >>> y = relu.forward(conv.forward(x, training=True), training=True)
    >>> dx = conv.backward(relu.backward(torch.ones_like(y)))
    >>> sorted(conv.grads), tuple(dx.shape)
    (['bias', 'weight'], (2, 3, 5, 5))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab.initializers import check_dropout_p, conv_default_init_, dropout_mask

__all__ = [
    "ELU",
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2d",
    "Layer",
    "PerActivationBatchNorm",
    "ReLU",
    "conv_default_init_",
    "dropout_mask",
    "set_compute_dtype",
]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


# Elements per slice of the batch axis in the CPU element-wise passes: 2**22 values
# (16 MiB in float32). A slice's temporary is below glibc's mmap threshold (so it is
# reused, not page-faulted, from one call to the next) and the number of kernel launches
# stays small: each is an OpenMP barrier, which costs milliseconds when other processes
# compete for the cores. (Measured on a 2-core Xeon: slices of 2**18 to 2**22 values are
# within 15% of each other on a quiet machine, and smaller slices are far slower on a busy one.)
_CHUNK_ELEMENTS = 1 << 22


def _batch_chunks(*tensors: Tensor) -> zip:
    """Matching cache-sized slices of tensors along the batch axis (one slice off CPU)."""
    x = tensors[0]
    if x.device.type != "cpu" or x.numel() <= _CHUNK_ELEMENTS or x.shape[0] <= 1:
        return zip(*[(t,) for t in tensors], strict=True)
    size = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))
    return zip(*[t.split(size) for t in tensors], strict=True)


def _is_dense(x: Tensor) -> bool:
    """Whether ``x`` owns distinct memory for every element (no broadcast strides)."""
    if x.is_contiguous():
        return True
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _check_4d(x: Tensor, layer: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{layer}: expected 4D input (N, C, H, W) (got {x.dim()}D input)")


def _check_channels(x: Tensor, num_features: int) -> None:
    """PyTorch's error for a feature count (axis 1 of ``x``) other than ``num_features``."""
    if x.shape[1] != num_features:
        raise RuntimeError(
            f"running_mean should contain {x.shape[1]} elements not {num_features}"
        )


class Layer:
    """Base of the manual layers: parameters, buffers, gradients, and the cache.

    ``params``  name → tensor, trainable (``requires_grad`` stays False: no autograd)
    ``buffers`` name → tensor, state that is not trained (BN's running statistics)
    ``grads``   name → tensor, dL/d``params[name]`` from the last ``backward``

    Subclasses implement :meth:`forward` and :meth:`backward`; the cache of a forward is
    dropped by :meth:`clear` or by the next forward.
    """

    def __init__(self) -> None:
        self.params: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """Compute the output and keep what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        """Given dL/dy of the last forward, fill ``self.grads`` and return dL/dx (or None)."""
        raise NotImplementedError

    def clear(self) -> None:
        """Drop the tensors kept for the backward pass (frees activation memory)."""

    def state_tensors(self) -> dict[str, Tensor]:
        """Parameters then buffers, in ``torch.nn.Module.state_dict`` order."""
        return {**self.params, **self.buffers}

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> Layer:
        """Move parameters and buffers, like ``torch.nn.Module.to``; returns ``self``.

        ``dtype`` converts floating-point tensors only (``num_batches_tracked`` stays
        int64); ``memory_format`` applies to 4D tensors only (the convolution weights).
        """

        def convert(t: Tensor) -> Tensor:
            kwargs: dict[str, Any] = {"device": device}
            if dtype is not None and t.is_floating_point():
                kwargs["dtype"] = dtype
            if memory_format is not None and t.dim() == 4:
                kwargs["memory_format"] = memory_format
            return t.to(**kwargs)

        self.params = {k: convert(v) for k, v in self.params.items()}
        self.buffers = {k: convert(v) for k, v in self.buffers.items()}
        self.grads = {}
        self.clear()
        return self

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


# ---------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------


class Conv2d(Layer):
    r"""2D convolution (cross-correlation), any stride and zero padding, optional bias.

    Forward: ``y = conv2d(x, weight) + bias`` with shapes

        x : (N, C_in, H, W)   weight : (C_out, C_in, kH, kW)   bias : (C_out,)
        y : (N, C_out, H_out, W_out),  H_out = (H + 2 pH - kH) // sH + 1

    Backward. ``y[n, o, i, j] = sum_{c, p, q} weight[o, c, p, q] x[n, c, sH i + p - pH,
    sW j + q - pW] + bias[o]`` is linear in each argument, so::

        dbias[o]        = sum_{n, i, j} dy[n, o, i, j]                    (ours)
        dweight[o,c,p,q] = sum_{n, i, j} dy[n, o, i, j] x[n, c, sH i + p - pH, sW j + q - pW]
        dx              = the transposed convolution of dy with weight (zero where the
                          padding or the stride skipped an input)

    ``dweight`` and ``dx`` are computed by ``aten.convolution_backward`` (the same
    kernels autograd uses, channels_last aware); ``dbias`` is a sum over (N, H, W).

    The parameters get PyTorch's default initialization (:func:`conv_default_init_`,
    drawn from ``generator``); ``init=False`` leaves them uninitialized (``torch.empty``)
    and draws nothing, for a caller that fills them itself (the post net's N(0, 0.05²)).

    Mixed precision by hand (``compute_dtype=torch.bfloat16``, or
    :func:`set_compute_dtype` on a network), what ``torch.autocast`` does to a convolution::

        forward : x16 = x.to(bf16), w16 = weight.to(bf16), b16 = bias.to(bf16)
                  y   = conv2d(x16, w16, b16)                       (bfloat16 out)
        backward: dy16 = dy.to(bf16)
                  dx, dweight16 = convolution_backward(dy16, x16, w16)  (dx in bfloat16)
                  dweight = dweight16.to(weight.dtype)     (float32 master gradient)
                  dbias   = sum_{N,H,W} dy16, accumulated in float32

    The master ``weight``/``bias`` and their gradients stay float32, so the optimizer's
    update and state are float32; only the copies the products read are bfloat16 (half the
    memory traffic, and the CPU's AMX/AVX512-BF16 units). The layers after it see bfloat16
    activations, as under autocast: BN computes its statistics in float32 from them
    (:mod:`bnlab.functional`), the loss upcasts the logits
    (:func:`bnlab.manual.loss.softmax_cross_entropy`).

    >>> conv = Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    >>> conv.forward(torch.randn(2, 3, 8, 8), training=True).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(
                f"Conv2d needs positive channel counts, got in_channels={in_channels}, "
                f"out_channels={out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        if min(self.stride) < 1 or min(self.padding) < 0 or min(self.kernel_size) < 1:
            raise ValueError(
                f"Conv2d: invalid kernel_size={self.kernel_size}, stride={self.stride} or "
                f"padding={self.padding}"
            )
        factory = {"device": device, "dtype": dtype}
        self.params["weight"] = torch.empty(out_channels, in_channels, *self.kernel_size, **factory)
        if bias:
            self.params["bias"] = torch.empty(out_channels, **factory)
        if init:
            conv_default_init_(self.params["weight"], self.params.get("bias"), generator)
        _check_compute_dtype(compute_dtype)
        self.compute_dtype = compute_dtype
        self._x: Tensor | None = None
        self._weight: Tensor | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """``y = conv2d(x, weight, bias)``; keeps ``x`` (and the weight it used) for the
        backward, both as ``compute_dtype`` copies when one is set."""
        _check_4d(x, "Conv2d")
        weight, bias = self.params["weight"], self.params.get("bias")
        if self.compute_dtype is not None:  # mixed precision: low-precision copies
            x, weight = x.to(self.compute_dtype), weight.to(self.compute_dtype)
            bias = None if bias is None else bias.to(self.compute_dtype)
        self._x, self._weight = x, weight
        return torch.nn.functional.conv2d(x, weight, bias, self.stride, self.padding)

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        """``dbias = sum_{N,H,W} dy``; ``dweight``, ``dx`` by the convolution-backward kernel.

        With a ``compute_dtype``, ``dy`` is cast to it, ``dx`` comes back in it, and
        ``dweight``/``dbias`` are returned in the master parameters' dtype.
        """
        x, weight = self._x, self._weight
        if x is None or weight is None:
            raise RuntimeError("Conv2d.backward called before forward")
        if self.compute_dtype is not None:
            dy = dy.to(self.compute_dtype)
        dx, dweight, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, self.stride, self.padding, (1, 1), False, (0, 0), 1,
            (need_dx, True, False),
        )
        self.grads["weight"] = dweight.to(self.params["weight"].dtype)  # no-op in one dtype
        if "bias" in self.params:
            self.grads["bias"] = dy.sum((0, 2, 3), dtype=self.params["bias"].dtype)  # dbias
        return dx

    def clear(self) -> None:
        self._x = None
        self._weight = None

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}"
        )
        if self.compute_dtype is not None:
            text += f", compute_dtype={self.compute_dtype}"
        return text


_COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


def _check_compute_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be None, torch.bfloat16 or torch.float16, got {dtype}"
        )


def set_compute_dtype(network: Iterable[tuple[str, Layer]], dtype: torch.dtype | None) -> int:
    """Mixed precision by hand: every :class:`Conv2d` of ``network`` computes in ``dtype``.

    ``network`` is a :class:`bnlab.manual.Sequential` (or any iterable of
    ``(name, layer)`` pairs); ``dtype`` is ``torch.bfloat16`` (what ``torch.autocast`` uses on
    CPU and on recent GPUs), ``torch.float16``, or None to switch back to the parameters'
    dtype. Parameters, gradients and optimizer state are untouched (float32 masters).
    Returns the number of convolutions changed. Raises ``ValueError`` for another dtype.

    >>> from bnlab.manual import all_cnn_c
    >>> set_compute_dtype(all_cnn_c(bn=True, width=0.125), torch.bfloat16)
    9
    """
    _check_compute_dtype(dtype)
    count = 0
    for _, layer in network:
        if isinstance(layer, Conv2d):
            layer.compute_dtype = dtype
            layer.clear()
            count += 1
    return count


# ---------------------------------------------------------------------------------------
# Batch normalization
# ---------------------------------------------------------------------------------------


class _NormLayer(Layer):
    """What every BN layer of the manual engine holds, as ``torch.nn.BatchNorm2d`` makes it.

    The hyperparameters (``num_features``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``), the parameters gamma = 1 (``weight``) and beta = 0 (``bias``,
    left out when ``bias=False``) of shape (C,) when ``affine``, and the buffers
    ``running_mean`` = 0, ``running_var`` = ``running_var_init`` (C,) and
    ``num_batches_tracked`` = 0 when ``track_running_stats``; plus the bookkeeping of the
    backward (the forward's cache, the gradients of gamma and beta). Subclasses:
    :class:`_BatchNorm` here and the variants of :mod:`bnlab.manual.norms`. Raises
    ``ValueError`` when ``num_features`` is not positive.
    """

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        *,
        bias: bool = True,
        running_var_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.params["weight"] = torch.ones(num_features, **factory)
            if bias:
                self.params["bias"] = torch.zeros(num_features, **factory)
        if track_running_stats:
            self.buffers["running_mean"] = torch.zeros(num_features, **factory)
            self.buffers["running_var"] = torch.full((num_features,), running_var_init, **factory)
            self.buffers["num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=device)
        self._cache: Any = None

    def _set_grads(self, dgamma: Tensor, dbeta: Tensor) -> None:
        """Keep ``dgamma``/``dbeta`` as the gradients of the parameters the layer has."""
        if "weight" in self.params:
            self.grads["weight"] = dgamma
        if "bias" in self.params:
            self.grads["bias"] = dbeta

    def _cached(self) -> Any:
        """What the forward kept; ``RuntimeError`` when backward comes before forward."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._cache

    def clear(self) -> None:
        self._cache = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class _BatchNorm(_NormLayer):
    r"""Batch normalization over the *feature view* of the input, with PyTorch's semantics.

    The math is :mod:`bnlab.functional`'s (Ioffe & Szegedy 2015, Algorithm 1)::

        x_hat = (x - mu) / sqrt(var + eps)        y = gamma * x_hat + beta
        dbeta = sum(dy)     dgamma = sum(dy * x_hat)
        dx    = gamma / (m sqrt(var + eps)) * (m dy - dbeta - x_hat dgamma)   (training)
        dx    = gamma / sqrt(var + eps) * dy                                 (evaluation)

    with sums over the m values of one feature. The feature axis is axis 1 of
    :meth:`_features` (x); a subclass chooses the view: per channel for (N, C, H, W)
    (:class:`BatchNorm2d`: the view is ``x`` itself), or per activation
    (:class:`PerActivationBatchNorm`: ``x.reshape(N, C * H * W)``, with
    ``num_features = C*H*W``, the post's case c); :meth:`backward` reshapes ``dx`` back to
    the input's shape.

    Momentum, buffers and modes exactly as ``torch.nn.BatchNorm*d`` (and ``bnlab.nn``):
    in training mode ``num_batches_tracked += 1`` and the running averages move by
    ``momentum`` toward the batch mean and the *unbiased* batch variance
    (``momentum=None``: the cumulative average, factor ``1 / num_batches_tracked``); in
    evaluation mode the running statistics normalize, or the batch statistics when
    ``track_running_stats=False``. ``affine=False`` has no gamma/beta; ``bias=False``
    keeps gamma only (a scale-only BN, like TensorFlow's ``center=False`` and PyTorch's
    ``BatchNorm2d(..., bias=False)``). ``bias_correction=True`` divides out the initial
    values' weight from the running averages in evaluation mode (the post's Q5; see
    :func:`bnlab.functional.bias_corrected_running_stats`).

    Two keywords reproduce the post's BN layers, which differ from PyTorch's defaults:
    ``running_var_init`` is the initial running variance (PyTorch 1; the post's
    TensorFlow code 0), and ``unbiased_running_var=False`` averages the *biased* batch
    variance into the running variance (the post's hand-written BN) instead of the
    unbiased one (PyTorch, and TensorFlow's fused BN).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        bias_correction: bool = False,
        running_var_init: float = 1.0,
        unbiased_running_var: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, bias=bias,
            running_var_init=running_var_init, device=device, dtype=dtype,
        )
        self.bias_correction = bias_correction
        self.running_var_init = running_var_init
        self.unbiased_running_var = unbiased_running_var

    def _features(self, x: Tensor) -> Tensor:
        """The view of ``x`` whose axis 1 holds the features BN normalizes separately."""
        return x

    def _check_input(self, x: Tensor) -> None:
        """Input checks; subclasses add the dimension check."""

    def _statistics(
        self,
        xf: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        use_batch_stats: bool,
        training: bool,
    ) -> tuple[F.BatchNormSaved, int]:
        """The statistics that normalize ``xf``, and the count ``m`` the batch ones came from.

        Batch statistics of ``xf`` itself, or the running ones; a subclass may merge them
        over processes (:mod:`bnlab.manual.distributed`). Raises ``ValueError`` when batch
        statistics would rest on one value per feature (none at all is a no-op, as in torch).
        """
        if use_batch_stats:  # 0 values (an empty input) is a no-op
            F.check_values_per_channel(xf)
        count = F.num_per_channel(xf)
        saved = F.batch_norm_prepare(
            xf, running_mean, running_var, training=use_batch_stats, eps=self.eps
        )
        return saved, count

    def _gradients(
        self, dyf: Tensor, xf: Tensor, saved: F.BatchNormSaved
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(dx, dgamma, dbeta)`` of the feature view: ``functional.batch_norm_backward``."""
        return F.batch_norm_backward(dyf, xf, saved, self.params.get("weight"))

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """Normalize with batch statistics (training) or running statistics (evaluation)."""
        self._check_input(x)
        xf = self._features(x)
        _check_channels(xf, self.num_features)
        buffers = self.buffers
        counter = buffers["num_batches_tracked"] if self.track_running_stats else None
        factor = F.step_factor(counter, self.momentum, training)
        use_batch_stats = training or not self.track_running_stats
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        F.validate_batch_norm_args(
            xf, self.params.get("weight"), self.params.get("bias"), running_mean, running_var,
            training=use_batch_stats, eps=self.eps,
        )
        if not use_batch_stats and self.bias_correction:
            running_mean, running_var = F.bias_corrected_running_stats(
                running_mean, running_var, int(buffers["num_batches_tracked"]), self.momentum,
                initial_var=self.running_var_init,
            )
        saved, count = self._statistics(xf, running_mean, running_var, use_batch_stats, training)
        if training and self.track_running_stats:
            F.update_running_stats(
                buffers["running_mean"], buffers["running_var"], saved.mean, saved.var,
                count, factor, unbiased=self.unbiased_running_var,
            )
        y = F.batch_norm_normalize(xf, saved, self.params.get("weight"), self.params.get("bias"))
        self._cache = (xf, saved, x.shape)
        return y.view(x.shape) if y.shape != x.shape else y

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        """``dx, dgamma, dbeta`` from :func:`bnlab.functional.batch_norm_backward`."""
        xf, saved, shape = self._cached()
        dx, dgamma, dbeta = self._gradients(self._features(dy), xf, saved)
        self._set_grads(dgamma, dbeta)
        if not need_dx:
            return None
        return dx.view(shape) if dx.shape != shape else dx

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.affine and "bias" not in self.params:
            text += ", bias=False"
        if self.running_var_init != 1.0:
            text += f", running_var_init={self.running_var_init}"
        if not self.unbiased_running_var:
            text += ", unbiased_running_var=False"
        return text + (", bias_correction=True" if self.bias_correction else "")


class BatchNorm2d(_BatchNorm):
    """Per-channel batch normalization of (N, C, H, W) input: ``m = N * H * W`` per channel.

    Same arguments and state as ``torch.nn.BatchNorm2d`` / ``bnlab.nn.BatchNorm2d``; see
    :class:`_BatchNorm` for the math.

    >>> bn = BatchNorm2d(4)
    >>> y = bn.forward(torch.randn(8, 4, 3, 3), training=True)
    >>> dx = bn.backward(torch.randn_like(y))
    >>> int(bn.buffers["num_batches_tracked"]), sorted(bn.grads)
    (1, ['bias', 'weight'])
    """

    def _check_input(self, x: Tensor) -> None:
        _check_4d(x, "BatchNorm2d")


class PerActivationBatchNorm(_BatchNorm):
    r"""Batch normalization per activation: every (c, h, w) position is its own feature.

    The statistics are taken over the batch axis only, ``m = N`` values per feature, as
    in the post's hand-written BN of case c (``tf.nn.moments(x, axes=0)``)::

        x : (N, C, H, W)  viewed as  (N, C*H*W)   (NCHW flattening order; a channels_last
                                                   input is copied into that order)
        mu, var, gamma, beta, running_mean, running_var : (C*H*W,)
        x_hat = (x - mu) / sqrt(var + eps)        y = gamma * x_hat + beta

    The backward is :class:`_BatchNorm`'s with sums over the batch axis only. The output
    and ``dx`` are contiguous (N, C, H, W). The post's layer is
    ``PerActivationBatchNorm(C, H, W, eps=1e-8, bias=False, running_var_init=0.0,
    unbiased_running_var=False)`` (its gamma has TensorFlow's (H, W, C) order; ours is
    (C, H, W) flattened).

    >>> bn = PerActivationBatchNorm(2, 3, 3, bias=False)
    >>> y = bn.forward(torch.randn(4, 2, 3, 3), training=True)
    >>> dx = bn.backward(torch.randn_like(y))
    >>> bn.params["weight"].shape, tuple(dx.shape)
    (torch.Size([18]), (4, 2, 3, 3))
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        bias_correction: bool = False,
        running_var_init: float = 1.0,
        unbiased_running_var: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if min(channels, height, width) <= 0:
            raise ValueError(
                f"PerActivationBatchNorm needs positive sizes, got channels={channels}, "
                f"height={height}, width={width}"
            )
        super().__init__(
            channels * height * width, eps, momentum, affine, track_running_stats,
            bias=bias, bias_correction=bias_correction, running_var_init=running_var_init,
            unbiased_running_var=unbiased_running_var, device=device, dtype=dtype,
        )
        self.feature_shape = (channels, height, width)

    def _features(self, x: Tensor) -> Tensor:
        # a copy in NCHW order when x is channels_last; sizes spelled out for N = 0
        return x.reshape(x.shape[0], self.num_features)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.feature_shape:
            c, h, w = self.feature_shape
            raise ValueError(
                f"PerActivationBatchNorm: expected input of shape (N, {c}, {h}, {w}), got "
                f"{tuple(x.shape)}; build the layer for the (C, H, W) it normalizes"
            )

    def extra_repr(self) -> str:
        c, h, w = self.feature_shape
        return f"{c}, {h}, {w}, " + super().extra_repr().split(", ", 1)[1]


# ---------------------------------------------------------------------------------------
# Element-wise layers
# ---------------------------------------------------------------------------------------


class ReLU(Layer):
    r"""``y = max(x, 0)``; ``dx = dy * [y > 0]``.

    The derivative at 0 is taken as 0 (as PyTorch does). Only ``y`` is kept: ``y > 0``
    exactly where ``x > 0``, and ``y`` is usually kept anyway as the next layer's input.

    ``inplace=True`` overwrites ``x`` with ``y`` in the forward pass and ``dy`` with
    ``dx`` in the backward pass (when ``dy`` is a dense tensor, not a broadcast view): safe
    inside a network, where ``x`` is the output of a convolution or a BN (which keep their
    inputs, not their outputs) and ``dy`` a fresh gradient no one else reads.

    Speed: the mask ``[y > 0]`` is written as 0.0/1.0 into a float buffer, one
    cache-sized slice of the batch at a time, and multiplied into the gradient; on CPU that
    is 3-6x faster than ``torch.where(y > 0, dy, 0)`` or ``dy * (y > 0)`` (whose
    bool-to-float promotion is not vectorized) and allocates no full-size temporary.

    >>> relu = ReLU()
    >>> relu.forward(torch.tensor([-1.0, 2.0]), training=True)
    tensor([0., 2.])
    >>> relu.backward(torch.tensor([5.0, 5.0]))
    tensor([0., 5.])
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self._y: Tensor | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        y = x.clamp_min_(0.0) if self.inplace else x.clamp_min(0.0)
        self._y = y
        return y

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        y = self._y
        if y is None:
            raise RuntimeError("ReLU.backward called before forward")
        if not need_dx:
            return None
        if dy.shape != y.shape:
            raise ValueError(f"ReLU.backward: dy has shape {tuple(dy.shape)}, y {tuple(y.shape)}")
        dx = dy if self.inplace and _is_dense(dy) else torch.empty_like(y)
        mask = None
        for yc, dyc, dxc in _batch_chunks(y, dy, dx):
            if mask is None or mask.shape != yc.shape:
                mask = torch.empty_like(yc)
            torch.gt(yc, 0, out=mask)  # [y > 0] as 0.0 / 1.0
            torch.mul(dyc, mask, out=dxc)  # dx = dy * [y > 0]
        return dx

    def clear(self) -> None:
        self._y = None

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class ELU(Layer):
    r"""Exponential linear unit (Clevert et al. 2016) with a hand-written backward.

    Forward and its derivative::

        y  = x                    for x > 0          dy/dx = 1
        y  = alpha (exp(x) - 1)   for x <= 0         dy/dx = alpha exp(x) = y + alpha

    so ``dx = dy * positive_slope`` where ``x > 0`` and ``dx = dy * (y + alpha)`` where
    ``x <= 0``; ``positive_slope`` is 1 for the true derivative. ``positive_slope=2.0``
    reproduces the post's case c, whose hand-written derivative evaluates to
    ``[x > 0] + (elu([x <= 0] x) + 1)`` = 2 for x > 0 (and ``y + 1`` for x <= 0, right).

    Only ``y`` is kept: with ``alpha > 0``, ``y > 0`` exactly where ``x > 0``, and ``y``
    is the next layer's input anyway. Same forward as ``torch.nn.ELU(alpha)``. The
    backward writes ``dx`` one cache-sized slice of the batch at a time as
    ``(min(y, 0) + alpha + (positive_slope - alpha) [y > 0]) * dy``, with the mask as
    0.0/1.0 floats (as :class:`ReLU`; 4-5x faster on CPU than ``masked_fill_``/``where``).

    >>> elu = ELU()
    >>> elu.forward(torch.tensor([-1.0, 0.0, 2.0]), training=True)
    tensor([-0.6321,  0.0000,  2.0000])
    >>> elu.backward(torch.ones(3))
    tensor([0.3679, 1.0000, 1.0000])
    """

    def __init__(self, alpha: float = 1.0, *, positive_slope: float = 1.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"ELU needs alpha > 0 (the backward reads x > 0 off y), got {alpha}")
        self.alpha = alpha
        self.positive_slope = positive_slope
        self._y: Tensor | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        y = torch.nn.functional.elu(x, self.alpha)  # x > 0 ? x : alpha * expm1(x)
        self._y = y
        return y

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        y = self._y
        if y is None:
            raise RuntimeError("ELU.backward called before forward")
        if not need_dx:
            return None
        if dy.shape != y.shape:
            raise ValueError(f"ELU.backward: dy has shape {tuple(dy.shape)}, y {tuple(y.shape)}")
        extra = self.positive_slope - self.alpha  # what x > 0 needs on top of alpha
        dx = torch.empty_like(y)
        mask = None
        for yc, dyc, dxc in _batch_chunks(y, dy, dx):
            # dy/dx = min(y, 0) + alpha: y + alpha = alpha exp(x) for x <= 0, alpha for x > 0
            torch.clamp(yc, max=0.0, out=dxc).add_(self.alpha)
            if extra != 0.0:  # and positive_slope for x > 0 (alpha = 1 = slope: nothing to add)
                if mask is None or mask.shape != yc.shape:
                    mask = torch.empty_like(yc)
                torch.gt(yc, 0, out=mask)  # [x > 0] as 0.0 / 1.0
                dxc.add_(mask, alpha=extra)
            dxc.mul_(dyc)  # dx = dy * dy/dx
        return dx

    def clear(self) -> None:
        self._y = None

    def extra_repr(self) -> str:
        slope = f", positive_slope={self.positive_slope}" if self.positive_slope != 1 else ""
        return f"alpha={self.alpha}{slope}"


class Dropout(Layer):
    r"""Inverted dropout: ``y = x * mask`` in training, ``y = x`` in evaluation.

    ``mask = b / (1 - p)``, ``b ~ Bernoulli(1 - p)`` element-wise (:func:`dropout_mask`),
    so the expected output equals the input and evaluation needs no rescaling.
    Backward: ``dx = dy * mask`` (training), ``dx = dy`` (evaluation).

    ``generator`` is the ``torch.Generator`` the masks are drawn from (None: the global
    RNG); give the autograd twin a generator in the same state to share the masks.

    >>> drop = Dropout(0.5, generator=torch.Generator().manual_seed(0))
    >>> y = drop.forward(torch.ones(4), training=True)
    >>> bool(torch.equal(drop.backward(torch.ones(4)), y))
    True
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_dropout_p(p)
        self.p = p
        self.generator = generator
        self._mask: Tensor | None = None
        self._ran = False

    def forward(self, x: Tensor, training: bool) -> Tensor:
        self._ran = True
        if not training or self.p == 0.0:
            self._mask = None
            return x
        self._mask = dropout_mask(x, self.p, self.generator)
        return x * self._mask

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        if not self._ran:
            raise RuntimeError("Dropout.backward called before forward")
        if not need_dx:
            return None
        return dy if self._mask is None else dy * self._mask  # dx = dy * mask

    def clear(self) -> None:
        self._mask = None
        self._ran = False

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------------------------------
# Pooling and reshaping
# ---------------------------------------------------------------------------------------


class AvgPool2d(Layer):
    r"""Non-overlapping k x k average pooling (stride k, no padding).

    (N, C, H, W) → (N, C, H // k, W // k); rows and columns past the last whole window
    are dropped (same output as ``torch.nn.AvgPool2d(k)`` and TensorFlow's 'VALID'
    ``avg_pool``)::

        y[n, c, i, j] = 1/k² sum_{p, q < k} x[n, c, k i + p, k j + q]

    Each input lies in exactly one window, so the backward spreads every ``dy`` evenly::

        dx[n, c, k i + p, k j + q] = dy[n, c, i, j] / k²      (0 in the dropped rows/columns)

    ``divide_gradient=False`` copies ``dy`` to the k² inputs unscaled, a gradient k² = 4
    times too large: the post's case c (its ``tf_repeat`` upsampling). ``dx`` has the
    memory format of ``x``.

    >>> pool = AvgPool2d(2)
    >>> pool.forward(torch.arange(16.0).reshape(1, 1, 4, 4), training=True)
    tensor([[[[ 2.5000,  4.5000],
              [10.5000, 12.5000]]]])
    >>> pool.backward(torch.ones(1, 1, 2, 2))[0, 0, 0]
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def __init__(self, kernel_size: int = 2, *, divide_gradient: bool = True) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"AvgPool2d needs kernel_size >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.divide_gradient = divide_gradient
        self._x: Tensor | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        _check_4d(x, "AvgPool2d")
        k = self.kernel_size
        if x.shape[2] < k or x.shape[3] < k:
            raise ValueError(
                f"AvgPool2d: input {tuple(x.shape)} is smaller than the {k}x{k} window"
            )
        self._x = x  # for its shape and memory format (the previous layer keeps it anyway)
        return torch.nn.functional.avg_pool2d(x, k)

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        x = self._x
        if x is None:
            raise RuntimeError("AvgPool2d.backward called before forward")
        if not need_dx:
            return None
        k = self.kernel_size
        n, c, h_out, w_out = dy.shape
        share = dy / (k * k) if self.divide_gradient else dy  # dy / k² (or dy: case c)
        dx = torch.empty_like(x)
        # dx[n, c, k i + p, k j + q] viewed as windows (N, C, H_out, k, W_out, k)
        windows = dx[:, :, : h_out * k, : w_out * k].unflatten(2, (h_out, k))
        windows = windows.unflatten(4, (w_out, k))
        windows.copy_(share.view(n, c, h_out, 1, w_out, 1))
        dx[:, :, h_out * k :].zero_()  # rows and columns outside every window
        dx[:, :, :, w_out * k :].zero_()
        return dx

    def clear(self) -> None:
        self._x = None

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}"
        return text + ("" if self.divide_gradient else ", divide_gradient=False")


class GlobalAvgPool2d(Layer):
    r"""Mean over the spatial axes: (N, C, H, W) → (N, C, 1, 1).

    ``y[n, c] = 1/(H W) sum_{i, j} x[n, c, i, j]``, so every input position receives an
    equal share: ``dx[n, c, i, j] = dy[n, c] / (H W)`` (returned as a broadcast view).
    Same output as ``torch.nn.AdaptiveAvgPool2d(1)``.

    ``divide_gradient=False`` returns ``dy`` itself at every position, H W times too large
    (with the loss's missing 1/N, the post's case c "loss" error: softmax - onehot fed
    straight into the 8x8 map).

    >>> gap = GlobalAvgPool2d(divide_gradient=False)
    >>> y = gap.forward(torch.randn(2, 3, 4, 4), training=True)
    >>> bool((gap.backward(torch.ones_like(y)) == 1).all())
    True
    """

    def __init__(self, *, divide_gradient: bool = True) -> None:
        super().__init__()
        self.divide_gradient = divide_gradient
        self._shape: torch.Size | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        _check_4d(x, "GlobalAvgPool2d")
        self._shape = x.shape
        return x.mean((2, 3), keepdim=True)

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        if self._shape is None:
            raise RuntimeError("GlobalAvgPool2d.backward called before forward")
        if not need_dx:
            return None
        h, w = self._shape[2], self._shape[3]
        share = dy / (h * w) if self.divide_gradient else dy  # dy / (H W) (or dy: case c)
        return share.expand(self._shape)  # dx = the share at every position

    def clear(self) -> None:
        self._shape = None

    def extra_repr(self) -> str:
        return "" if self.divide_gradient else "divide_gradient=False"


class Flatten(Layer):
    """(N, C, 1, 1) or any (N, ...) → (N, prod(...)); the backward restores the shape.

    Same output as ``torch.nn.Flatten()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shape: torch.Size | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        if self._shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        return dy.reshape(self._shape) if need_dx else None

    def clear(self) -> None:
        self._shape = None
