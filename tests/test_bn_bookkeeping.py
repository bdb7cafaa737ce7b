"""The step bookkeeping every BN layer shares (bnlab.functional.step_factor,
check_values_per_channel; bnlab.functional_sync.sync_group), against PyTorch's BN."""

from __future__ import annotations

import pytest
import torch

from bnlab import functional as F
from bnlab import functional_sync as FS
from bnlab import kernels
from bnlab import nn as bnn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_step_factor_gives_torch_running_averages(momentum):
    """Averaging with the factors of step_factor reproduces bnlab.nn.BatchNorm1d's buffers
    bit for bit (on the eager reference path: the fused kernel's sums round differently) and
    torch.nn.BatchNorm1d's to rounding (its variance kernel differs), and
    num_batches_tracked counts the same."""
    gen = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    ours = bnn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    count = torch.tensor(0)
    for step in range(5):
        x = torch.randn(7, 3, generator=gen, dtype=torch.float64) * (step + 1) + step
        bn(x)
        with kernels.disabled():  # the reference statistics, as computed below
            ours(x)
        factor = F.step_factor(count, momentum, True)
        if momentum is None:
            assert factor == 1.0 / (step + 1)
        saved = F.batch_norm_prepare(x, training=True)
        F.update_running_stats(rm, rv, saved.mean, saved.var, 7, factor)
    assert int(count) == int(bn.num_batches_tracked) == int(ours.num_batches_tracked) == 5
    assert torch.equal(rm, ours.running_mean) and torch.equal(rv, ours.running_var)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-13, atol=0)


def test_step_factor_counts_only_training_steps_with_a_counter():
    count = torch.tensor(3)
    assert F.step_factor(count, 0.2, False) == 0.2 and int(count) == 3
    assert F.step_factor(count, None, False) == 0.0 and int(count) == 3
    assert F.step_factor(None, None, True) == 0.0
    assert F.step_factor(count, 0.2, True) == 0.2 and int(count) == 4


def test_check_values_per_channel_is_torch_check():
    for shape in [(1, 3), (1, 3, 1, 1), (1, 2, 1)]:
        with pytest.raises(ValueError, match=r"more than 1 value per channel.*input size"):
            F.check_values_per_channel(torch.zeros(shape))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            torch.nn.functional.batch_norm(torch.zeros(shape), None, None, training=True)
    for shape in [(2, 3), (1, 3, 2, 1), (0, 3), (1, 3, 0)]:
        F.check_values_per_channel(torch.zeros(shape))  # no error
    with pytest.raises(ValueError, match="virtual batch"):
        F.check_values_per_channel(torch.zeros(1, 3), "virtual batch")


def test_sync_group_is_local_without_a_process_group():
    assert FS.sync_group(None, True) == (None, 1)
    assert FS.sync_group(None, False) == (None, 1)
