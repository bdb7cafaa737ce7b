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
