"""`bnlab bench data`: the per-image reference it times against returns exactly bnlab's batch,
and the command prints its table and JSON. No speed is asserted here (benchmarks measure it)."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab import data
from bnlab.bench import bench_data, crop_flip_per_image
from bnlab.cli import main


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_reference_is_the_batched_augmentation(seed):
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed + 10))
    ours = data.random_crop_flip(images, torch.Generator().manual_seed(seed))
    reference = crop_flip_per_image(images, torch.Generator().manual_seed(seed))
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, images)  # it did crop or flip something


def test_bench_data_rows_and_restores_threads():
    threads = torch.get_num_threads()
    rows = bench_data(batch_size=8, repeats=2, threads=1)
    assert torch.get_num_threads() == threads
    assert [r["variant"] for r in rows] == ["bnlab, batched gather", "per-image loop"]
    assert all(r["batch_ms"] > 0 and r["batch_size"] == 8 and r["threads"] == 1 for r in rows)
    assert rows[1]["speedup"] == pytest.approx(1.0)


def test_bench_data_command(tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--batch-size", "8", "--repeats", "2", "--json",
                 str(out)]) == 0
    assert "per-image loop" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2 and "machine" in saved


# ---- bnlab bench bn: every path is checked against the eager reference before it is timed ----

class _WrongBackward(torch.autograd.Function):
    """BN whose input gradient misses the mean term: off by far more than rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.nn.functional.batch_norm(x, None, None, weight, bias, True)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return dy * weight.view(1, -1, 1, 1), dy.sum((0, 2, 3)), dy.sum((0, 2, 3))


class _WrongBN(torch.nn.BatchNorm2d):
    def forward(self, x):
        return _WrongBackward.apply(x, self.weight, self.bias)


def test_validate_bn_paths_flags_a_wrong_backward():
    from bnlab import nn as bnn
    from bnlab.bench import validate_bn_paths

    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    dy = torch.randn(8, 4, 5, 5)
    mods = {"native": torch.nn.BatchNorm2d(4), "bnlab": bnn.BatchNorm2d(4), "wrong": _WrongBN(4)}
    verdicts = validate_bn_paths(mods, x, dy, reference="bnlab")
    print(verdicts)
    assert verdicts["native"] == "" and verdicts["bnlab"] == ""
    assert verdicts["wrong"].startswith("wrong dx disagrees with bnlab")


def test_bench_bn_times_native_eager_and_fused():
    from bnlab import kernels
    from bnlab.bench import bench_bn

    rows = bench_bn(shapes=((4, 8, 6, 6),), repeats=1, layers=("BatchNorm2d",))
    assert [(r.memory_format, r.pass_) for r in rows] == [
        (f, p) for f in ("contiguous", "channels_last")
        for p in ("forward", "backward", "forward+backward")]
    assert all(r.native_ms > 0 and r.bnlab_ms > 0 for r in rows)
    if kernels.load():
        assert all(r.fused_ms > 0 and r.note == "" for r in rows)
    else:
        assert all(r.fused_ms != r.fused_ms and "fused" in r.note for r in rows)  # NaN


def test_bench_bn_eager_column_runs_no_kernel(monkeypatch):
    """The eager column times bnlab.nn on the reference (forward and backward), the fused
    column bnlab.nn as it runs by default."""
    from bnlab import kernels
    from bnlab import nn as bnn
    from bnlab.bench import _EagerBatchNorm2d

    if not kernels.load():
        pytest.skip("no fused kernel here")
    calls = []
    for op in ("stats", "normalize", "backward"):
        real = getattr(torch.ops.bnlab_fused, op)
        monkeypatch.setattr(torch.ops.bnlab_fused, op,
                            lambda *a, _op=op, _real=real: calls.append(_op) or _real(*a))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    _EagerBatchNorm2d(3)(x).sum().backward()
    assert calls == []
    bnn.BatchNorm2d(3)(x).sum().backward()
    assert calls == ["stats", "normalize", "backward"]
