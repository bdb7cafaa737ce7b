r"""A sequential network of named manual layers, and one training step with no autograd.

Back propagation is the chain rule applied layer by layer in reverse: with
``y_i = f_i(y_{i-1})`` and ``y_0 = x``,

    dL/dy_{i-1} = (dL/dy_i) · ∂f_i/∂y_{i-1}        (``layer_i.backward``)
    dL/dθ_i     = (dL/dy_i) · ∂f_i/∂θ_i             (filled into ``layer_i.grads``)

starting from ``dL/dlogits`` of :func:`bnlab.manual.loss.softmax_cross_entropy`.

Names are ``<layer>.<tensor>`` (``conv1.weight``, ``bn1.running_mean``), exactly the
``state_dict`` keys of an ``nn.Sequential`` with the same named children, so weights
copy across the two engines both ways.

Usage::

    >>> import torch
    >>> from bnlab.manual import Sequential, Conv2d, ReLU, GlobalAvgPool2d, Flatten
    >>> from bnlab.manual import softmax_cross_entropy
    >>> net = Sequential([("conv1", Conv2d(3, 10, 3)), ("relu1", ReLU()),
    ...                   ("pool", GlobalAvgPool2d()), ("flatten", Flatten())])
    >>> with torch.no_grad():
    ...     logits = net.forward(torch.randn(4, 3, 8, 8))
    ...     loss, dlogits = softmax_cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    ...     dx = net.backward(dlogits)
    >>> list(net.named_parameters())
    ['conv1.weight', 'conv1.bias']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import torch
from torch import Tensor

from bnlab.manual.layers import Layer
from bnlab.manual.loss import softmax_cross_entropy

__all__ = ["Sequential", "StepOptimizer", "train_step"]


class Sequential:
    """Named layers applied in order; ``backward`` walks them in reverse.

    ``layers`` is a list of ``(name, layer)`` pairs or a mapping name → layer. The network
    starts in training mode (like ``torch.nn.Module``); :meth:`train` / :meth:`eval` switch.

    ``mean_gradient`` (True unless a builder says otherwise: the post net with its
    ``"loss"`` error) tells a trainer what to pass to :func:`train_step`.
    """

    mean_gradient: bool = True

    def __init__(self, layers: Iterable[tuple[str, Layer]] | Mapping[str, Layer]) -> None:
        pairs = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
        self.layers: dict[str, Layer] = {}
        for name, layer in pairs:
            if not name or "." in name:
                raise ValueError(f"layer names must be non-empty and without '.', got {name!r}")
            if name in self.layers:
                raise ValueError(f"duplicate layer name {name!r}")
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a manual Layer")
            self.layers[name] = layer
        self.training = True

    # -- running -------------------------------------------------------------------------

    def forward(self, x: Tensor, training: bool | None = None) -> Tensor:
        """Run every layer on ``x`` in order (``training`` defaults to the network's mode)."""
        training = self.training if training is None else training
        for layer in self.layers.values():
            x = layer.forward(x, training)
        return x

    def predict(self, x: Tensor) -> Tensor:
        """Evaluation-mode forward that keeps nothing for a backward pass (for testing).

        >>> from bnlab.manual import Flatten
        >>> Sequential([("flatten", Flatten())]).predict(torch.ones(2, 1, 2)).shape
        torch.Size([2, 2])
        """
        for layer in self.layers.values():
            x = layer.forward(x, False)
            layer.clear()
        return x

    def backward(
        self, dy: Tensor, need_input_grad: bool = True, retain: bool = False
    ) -> Tensor | None:
        """Back-propagate dL/d(output) through every layer; return dL/d(input).

        Fills ``layer.grads`` of every layer. With ``need_input_grad=False`` the layers
        before the first one with parameters are skipped and the first parameterized
        layer computes no input gradient (what a training step wants); returns None then.
        Each layer's cached activations are released as soon as its backward is done (as
        autograd frees a graph), so the allocator can reuse that memory for the
        gradients still to come; ``retain=True`` keeps them for another backward.
        """
        layers = list(self.layers.values())
        first = 0
        if not need_input_grad:
            first = next((i for i, layer in enumerate(layers) if layer.params), len(layers))
        for i in range(len(layers) - 1, first - 1, -1):
            dy = layers[i].backward(dy, need_dx=need_input_grad or i > first)
            if not retain:
                layers[i].clear()
        if not retain:
            for layer in layers[:first]:
                layer.clear()
        return dy if need_input_grad else None

    def clear(self) -> None:
        """Drop every tensor the layers keep for the backward pass."""
        for layer in self.layers.values():
            layer.clear()

    # -- modes, tensors ------------------------------------------------------------------

    def train(self, mode: bool = True) -> Sequential:
        """Training mode (batch statistics, dropout on); returns ``self``."""
        self.training = mode
        return self

    def eval(self) -> Sequential:
        """Evaluation mode (running statistics, dropout off); returns ``self``."""
        return self.train(False)

    def __getitem__(self, name: str) -> Layer:
        """The layer called ``name`` (``net["conv1"].params["weight"]``)."""
        return self.layers[name]

    def __iter__(self) -> Iterator[tuple[str, Layer]]:
        """``(name, layer)`` pairs in order."""
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    def named_parameters(self) -> dict[str, Tensor]:
        """Trainable tensors by name (``conv1.weight``, ``bn1.bias``, ...), in layer order."""
        return {f"{n}.{k}": v for n, layer in self.layers.items() for k, v in layer.params.items()}

    def parameters(self) -> list[Tensor]:
        """The trainable tensors, in the order of :meth:`named_parameters`."""
        return list(self.named_parameters().values())

    def named_buffers(self) -> dict[str, Tensor]:
        """Non-trained state by name (``bn1.running_mean``, ``bn1.num_batches_tracked``)."""
        return {f"{n}.{k}": v for n, layer in self.layers.items() for k, v in layer.buffers.items()}

    def named_gradients(self) -> dict[str, Tensor]:
        """dL/dθ of the last :meth:`backward`, keyed like :meth:`named_parameters`."""
        grads = {}
        for n, layer in self.layers.items():
            for k in layer.params:
                if k not in layer.grads:
                    raise RuntimeError(
                        f"no gradient for {n}.{k}: run forward and backward before gradients()"
                    )
                grads[f"{n}.{k}"] = layer.grads[k]
        return grads

    def gradients(self) -> list[Tensor]:
        """The gradients of the last :meth:`backward`, in the order of :meth:`parameters`."""
        return list(self.named_gradients().values())

    def state_dict(self) -> dict[str, Tensor]:
        """Parameters and buffers by name, the keys and order of the ``nn.Module`` twin.

        The tensors are the network's own (like ``torch.nn.Module.state_dict``): clone
        them to keep a snapshot.
        """
        return {
            f"{n}.{k}": v
            for n, layer in self.layers.items()
            for k, v in layer.state_tensors().items()
        }

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Copy ``state_dict``'s tensors into this network's, in place.

        Our tensors keep their device, dtype and memory format (as in ``torch.nn``).
        ``strict=True`` requires exactly our keys. Raises ``RuntimeError`` naming the
        missing and unexpected keys or the shape mismatches; nothing is copied then.
        """
        ours = self.state_dict()
        missing = [k for k in ours if k not in state_dict]
        unexpected = [k for k in state_dict if k not in ours]
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing))
        if strict and unexpected:
            errors.append(
                "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected)
            )
        for key, value in state_dict.items():
            if key in ours and tuple(value.shape) != tuple(ours[key].shape):
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} "
                    f"from checkpoint, the shape in current model is {tuple(ours[key].shape)}."
                )
        if errors:
            raise RuntimeError(
                "Error(s) in loading state_dict for manual Sequential:\n\t" + "\n\t".join(errors)
            )
        with torch.no_grad():
            for key, value in state_dict.items():
                if key in ours:
                    ours[key].copy_(value)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> Sequential:
        """Move every layer's tensors (see :meth:`Layer.to`); returns ``self``.

        Build optimizers after moving: the parameters are new tensors.
        """
        for layer in self.layers.values():
            layer.to(device, dtype, memory_format)
        return self

    def __repr__(self) -> str:
        lines = [f"  ({name}): {layer!r}" for name, layer in self.layers.items()]
        return "Sequential(\n" + "\n".join(lines) + "\n)"


class StepOptimizer(Protocol):
    """What :func:`train_step` needs of an optimizer (``bnlab.optim``'s have it)."""

    def step(self, grads: list[Tensor]) -> None: ...


@torch.no_grad()
def train_step(
    network: Sequential,
    optimizer: StepOptimizer,
    images: Tensor,
    labels: Tensor,
    label_smoothing: float = 0.0,
    *,
    mean_gradient: bool = True,
) -> tuple[Tensor, Tensor]:
    """One training step of the manual engine: forward, loss, backward, update.

    Runs entirely under ``torch.no_grad()``: no autograd graph is built. ``optimizer``
    must hold ``network.parameters()`` (in that order), e.g.
    ``bnlab.optim.Adam(network.parameters(), amsgrad=True)``. The activations kept for
    the backward pass are released during it. ``mean_gradient=False`` back-propagates
    ``p - q`` without the 1/N of the batch mean (see
    :func:`~bnlab.manual.loss.softmax_cross_entropy`; the post net's ``"loss"`` error:
    pass ``network.mean_gradient``). Returns ``(loss, logits)``; ``loss`` is the batch
    mean either way.
    """
    logits = network.forward(images, training=True)
    loss, dlogits = softmax_cross_entropy(
        logits, labels, label_smoothing, mean_gradient=mean_gradient
    )
    network.backward(dlogits, need_input_grad=False)  # releases the activations
    optimizer.step(network.gradients())
    return loss, logits
