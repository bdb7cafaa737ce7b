"""``bnlab bench distributed``: rows for 1 and 2 processes on one batch (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from bnlab.bench_distributed import bench_distributed
from bnlab.cli import main


def test_bench_distributed_command(tmp_path, capsys):
    out = tmp_path / "distributed.json"
    assert main(["bench", "distributed", "--engines", "manual", "--width", "0.0625",
                 "--batch-size", "4", "--steps", "1", "--rounds", "1", "--threads", "1",
                 "--json", str(out)]) == 0
    assert "shows the overhead" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["processes"], r["threads"]) for r in rows] == [
        ("manual", 1, 1), ("manual", 2, 1)]
    assert all(r["step_ms"] > 0 and r["batch_size"] == 4 for r in rows)
    assert rows[0]["vs_1"] == pytest.approx(1.0)


def test_bench_distributed_rejects_a_batch_smaller_than_the_processes():
    with pytest.raises(ValueError, match="batch_size 1 must be at least nprocs = 2"):
        bench_distributed(batch_size=1)
