"""The whole-network check: the manual engine's gradients against autograd's, in float64.

Builds All-CNN-C twice from one seed — the manual network (:func:`bnlab.manual.all_cnn_c`)
and its autograd twin (:class:`bnlab.models.AllCNNC`) — with random non-trivial BN
parameters and running statistics, runs one forward and backward pass on random images
in each, and returns the relative error of every output, gradient and buffer.

Usage::

    >>> from bnlab.check_engines import compare_engines
    >>> errors = compare_engines(norm="torch", dropout=True, training=True)
    >>> max(errors.values()) < 1e-10
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.manual.allcnn import all_cnn_c
from bnlab.manual.loss import softmax_cross_entropy
from bnlab.manual.network import Sequential
from bnlab.models import AllCNNC

__all__ = ["compare_engines", "randomize_batchnorm_", "relative_error"]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (the absolute error if expected is 0).

    >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    0.5
    """
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def randomize_batchnorm_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BN of ``model`` random gamma, beta and running statistics, in place.

    So that evaluation mode (which normalizes with the running statistics) and the
    gradients of gamma and beta are checked at values other than their initial 1 and 0.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase):
                c = module.num_features

                def draw(c: int = c, like: Tensor = module.running_mean) -> Tensor:
                    return torch.rand(c, generator=generator, dtype=torch.float64).to(like)

                module.weight.copy_(0.5 + draw())
                module.bias.copy_(draw() - 0.5)
                module.running_mean.copy_(draw() - 0.5)
                module.running_var.copy_(0.5 + draw())


def compare_engines(
    norm: str = "torch",
    dropout: bool = False,
    training: bool = True,
    width: float = 0.125,
    batch_size: int = 4,
    image_size: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Relative errors, manual engine vs autograd on ``AllCNNC(norm=...)``, after one pass.

    Keys: ``loss``, ``logits``, ``input`` (dL/d(images)), ``grad <name>`` for every
    parameter and ``buffer <name>`` for every floating-point buffer (BN's running
    statistics after the pass). ``norm="none"`` compares the network without BN. The
    dropout masks are shared: both engines draw them from generators seeded alike.
    """
    gen = torch.Generator().manual_seed(seed)
    model = AllCNNC(
        norm=norm, dropout=dropout, width=width, generator=gen,
        dropout_generator=_generator(device, seed + 1), device=device, dtype=dtype,
    )
    randomize_batchnorm_(model, gen)
    network: Sequential = all_cnn_c(
        bn=norm != "none", dropout=dropout, width=width,
        dropout_generator=_generator(device, seed + 1), device=device, dtype=dtype,
    )
    network.load_state_dict(model.state_dict())
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=mf)
    network.to(memory_format=mf)

    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen, dtype=dtype)
    images = images.to(device).contiguous(memory_format=mf)
    labels = torch.randint(0, 10, (batch_size,), generator=gen).to(device)

    model.train(training)
    leaf = images.clone().requires_grad_()
    logits_ref = model(leaf)
    loss_ref = torch.nn.functional.cross_entropy(
        logits_ref, labels, label_smoothing=label_smoothing
    )
    loss_ref.backward()

    with torch.no_grad():
        logits = network.forward(images, training=training)
        loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing)
        dimages = network.backward(dlogits)

    errors = {
        "loss": relative_error(loss, loss_ref.detach()),
        "logits": relative_error(logits, logits_ref.detach()),
        "input": relative_error(dimages, leaf.grad),
    }
    grads = network.named_gradients()
    for name, p in model.named_parameters():
        errors[f"grad {name}"] = relative_error(grads[name], p.grad)
    buffers = network.named_buffers()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            errors[f"buffer {name}"] = relative_error(buffers[name], b)
    return errors


def _generator(device: torch.device | str, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
