"""The BN variants in `bnlab gradcheck` and `bnlab bench bn`: rows exist, pass, and can fail.

No speed is asserted (benchmarks measure it)."""

from __future__ import annotations

import pytest
import torch

import bnlab.checks as checks
from bnlab.bench import BENCH_LAYERS, bench_bn
from bnlab.cli import main


def test_variant_rows_pass_in_float64():
    rows = checks.variant_gradcheck_rows(finite_differences=False)
    names = [r.name for r in rows]
    for layer in ("BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "GhostBatchNorm2d",
                  "GroupNorm", "manual BatchRenorm2d", "manual GhostBatchNorm2d",
                  "manual GroupNorm"):
        assert any(n.startswith(layer) for n in names), layer
    for r in rows:
        print(r.name, r.errors)
        assert r.passed and r.max_error < 1e-13, r.name


def test_a_wrong_reference_fails_its_row(monkeypatch):
    original = checks.textbook_group_norm

    def off_by_a_little(x, num_groups, gamma, beta, eps):
        return original(x, num_groups, gamma * 1.001, beta, eps)

    monkeypatch.setattr(checks, "textbook_group_norm", off_by_a_little)
    rows = {r.name: r for r in checks.variant_gradcheck_rows(finite_differences=False)}
    assert not rows["GroupNorm (N, C, H, W), G 2"].passed
    assert rows["BatchRenorm2d (N, C, H, W)"].passed


def test_finite_differences_of_one_row_each(monkeypatch):
    cases = {k: v for k, v in checks.VARIANT_CASES.items()
             if k in ("BatchRenorm2d channels_last", "GhostBatchNorm2d (B 3 of N 8)",
                      "GroupNorm channels_last, G 6")}
    monkeypatch.setattr(checks, "VARIANT_CASES", cases)
    rows = checks.variant_gradcheck_rows(finite_differences=True)
    assert len(rows) == 3 and all(r.gradcheck is True for r in rows)


def test_bn_rows_include_variants_only_by_default():
    only_bn = checks.bn_gradcheck_rows(shapes={"(N, C)": (6, 3)}, finite_differences=False)
    assert [r.name for r in only_bn] == ["(N, C)"]
    both = checks.bn_gradcheck_rows(shapes={"(N, C)": (6, 3)}, finite_differences=False,
                                    variants=True)
    assert len(both) == 1 + len(checks.VARIANT_CASES)


def test_gradcheck_command_lists_the_variants(capsys):
    assert main(["gradcheck", "--fast", "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("BatchRenorm2d", "GhostBatchNorm2d", "GroupNorm", "manual GroupNorm"):
        assert name in out
    assert "FAIL" not in out


def test_bench_bn_rows_for_every_layer():
    rows = bench_bn(shapes=((4, 8, 3, 3),), memory_formats=("channels_last",), repeats=1)
    assert [(r.layer, r.pass_) for r in rows] == [
        (layer, p) for layer in BENCH_LAYERS for p in ("forward", "backward",
                                                       "forward+backward")]
    natives = {r.layer: r.native for r in rows}
    assert natives["GroupNorm(32)"] == "torch.nn.GroupNorm"
    assert natives["BatchRenorm2d"] == natives["GhostBatchNorm2d(32)"] == "torch.nn.BatchNorm2d"
    assert all(r.native_ms > 0 and r.bnlab_ms > 0 for r in rows)
    assert rows[0].as_dict()["layer"] == "BatchNorm2d"


def test_bench_layers_compute_what_they_are_named():
    """Each bench pair's bnlab module is the named layer (GroupNorm: same numbers as native)."""
    x = torch.randn(4, 8, 3, 3)
    native, ours, _ = BENCH_LAYERS["GroupNorm(32)"]
    a, b = native(8), ours(8)
    assert type(b).__name__ == "GroupNorm" and b.num_groups == a.num_groups == 8
    assert torch.allclose(a(x), b(x), atol=1e-5)
    with pytest.raises(ValueError, match="unknown layers"):
        bench_bn(layers=("LayerNorm",))


def test_finite_difference_check_catches_a_wrong_backward(monkeypatch):
    # the fast-mode gradcheck of the command must still fail a backward that is off by 1%
    from bnlab import nn as bnn

    backward = bnn.BatchNormFunction.backward

    def wrong(ctx, *grads):
        out = backward(ctx, *grads)
        return (out[0] * 1.01, *out[1:])

    monkeypatch.setattr(bnn.BatchNormFunction, "backward", staticmethod(wrong))
    rows = checks.bn_gradcheck_rows(shapes={"BatchNorm2d": (8, 3, 4, 4)}, variants=False)
    assert rows[0].gradcheck is False and not rows[0].passed


def test_gradcheck_rows_are_reported_as_they_finish():
    seen = []
    rows = checks.bn_gradcheck_rows(shapes={"a": (6, 3), "b": (4, 2, 3)},
                                    finite_differences=False, on_row=seen.append)
    assert seen == rows and len(seen) == 2


def test_finite_difference_input_is_a_corner_in_the_same_layout():
    x = torch.randn(8, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    corner = checks.finite_difference_input(x)
    assert corner.shape == (4, 6, 3, 3) and corner.requires_grad and corner.is_leaf
    assert corner.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(corner.detach(), x[:4, :, :3, :3])
