"""Data-parallel training: ``bnlab compare --nproc 2`` is the one-process run, to rounding.

Each of 2 CPU processes (gloo on 127.0.0.1) takes a disjoint part of every batch (global
batches of 9: parts of 5 and 4, so the loss scaling of unequal parts is exercised; test
batches of 7 evaluated in parts too). In float64 every logged metric of two epochs of
case b (autograd: DistributedDataParallel + bnlab's SyncBatchNorm) and case c (manual
engine: synchronized BN, gradients all-reduced by hand) equals the one-process run with
the same global batch to 1e-9 relative: float64 rounds at 1e-16 per operation, and two
epochs of Adam/AMSGrad on a small net amplify that by far less than the 1e7 left.
A killed rank ends the job with a clear error, and the folder resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.compare import plan_comparison, run_comparison
from bnlab.distributed import launch
from tests import distributed_workers as W
from tests.cifar_fixtures import write_cifar10_folder

TOL = 1e-9
TIMING = {"epoch_time_s", "eval_time_s", "images_per_s"}
CASES = ["b", "c"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=10, test=20)  # 50 train, 20 test images
    return root


def overrides(data_dir: Path) -> dict:
    return {"epochs": 2, "width": 0.125, "batch_size": 9, "eval_batch_size": 7,
            "device": "cpu", "precision": "fp64", "data_dir": str(data_dir)}


def metrics(folder: Path, case: str) -> list[dict]:
    path = folder / case / "seed0" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_equal_one_in_float64(data_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    run_comparison(plan_comparison(CASES, 1, "quick", one, overrides(data_dir)), quiet=True)
    summaries = launch(W.compare_rank, 2, (CASES, str(two), overrides(data_dir)),
                       timeout_s=600)
    assert summaries[0]["diverged"] == [] and len(summaries[0]) > 1  # rank 0's summary
    assert summaries[1] == {"diverged": []}  # rank 1 writes nothing and has no summary
    for case in CASES:
        expected, actual = metrics(one, case), metrics(two, case)
        assert [r["epoch"] for r in actual] == [1, 2]
        for want, got in zip(expected, actual, strict=True):
            for key in sorted(set(want) - TIMING):
                rel = abs(got[key] - want[key]) / max(abs(want[key]), 1e-300)
                print(f"case {case} epoch {want['epoch']} {key}: 1 process {want[key]!r}, "
                      f"2 processes {got[key]!r}, relative error {rel:.1e}")
                assert rel <= TOL, (case, want["epoch"], key, rel)
        # the two runs are the same run: its config and files, rank 0's alone
        assert sorted(p.name for p in (two / case / "seed0").iterdir()) == \
            sorted(p.name for p in (one / case / "seed0").iterdir())
    assert (two / "summary.json").is_file() and (two / "report.html").is_file()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_rank_ends_the_job_and_the_folder_resumes(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cut"
    args = [sys.executable, "-m", "bnlab", "compare", "--cases", "b", "--seeds", "1",
            "--epochs", "6", "--width", "0.125", "--batch-size", "8", "--device", "cpu",
            "--data-dir", str(data_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([*args, "--nproc", "2", "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = out / "b" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if rows.exists() and rows.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before a rank could be killed (machine too fast)")
    # the ranks are the forkserver's children: the processes with a parent among ours
    below = descendants(proc.pid)
    ranks = [p for p in below if any(p in descendants(q) for q in below)]
    assert len(ranks) == 2, (below, ranks)
    os.kill(max(ranks), signal.SIGKILL)
    started = time.time()
    _, stderr = proc.communicate(timeout=120)
    print(stderr)
    assert time.time() - started < 60
    assert proc.returncode == 1
    assert "distributed run failed" in stderr and "exited with code -9" in stderr
    assert f"--resume {out}" in stderr
    assert "\n" not in stderr.strip()  # one line
    done = len(metrics(out, "b"))
    assert 1 <= done < 6
    subprocess.run([sys.executable, "-m", "bnlab", "compare", "--resume", str(out),
                    "--nproc", "2", "--quiet"], check=True, env=env, capture_output=True,
                   timeout=600)
    assert [r["epoch"] for r in metrics(out, "b")] == [1, 2, 3, 4, 5, 6]
    assert (out / "report.html").is_file()


def test_torchrun_runs_compare_with_rank_0_writing(data_dir: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m bnlab compare``: one report, one table, one folder."""
    from bnlab.distributed import free_port

    out = tmp_path / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "bnlab",
         "compare", "--cases", "c", "--seeds", "1", "--epochs", "1", "--width", "0.125",
         "--batch-size", "8",
         "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("== c:") == 1 and done.stdout.count("report:") == 1
    assert [r["epoch"] for r in metrics(out, "c")] == [1]
    assert (out / "report.html").is_file()


def test_a_batch_smaller_than_the_processes_is_a_clear_error() -> None:
    from bnlab.distributed import DistributedRunError

    fields = {"batch_size": 1, "width": 0.125, "device": "cpu", "norm": "torch"}
    with pytest.raises(DistributedRunError, match="batch size 1 is smaller than the 2 processes"):
        launch(W.build_model_rank, 2, (fields,), timeout_s=120)
    # a batch that does split: the autograd model is wrapped in DistributedDataParallel
    wrapped = launch(W.build_model_rank, 2, ({**fields, "batch_size": 2},), timeout_s=120)
    assert wrapped == ["DistributedDataParallel"] * 2


def test_divergence_is_seen_by_every_rank_at_the_same_step(data_dir: Path,
                                                           tmp_path: Path) -> None:
    """The check is on the global batch's loss, so all ranks stop together (no deadlock)."""
    fields = {"epochs": 2, "width": 0.125, "batch_size": 8, "device": "cpu", "norm": "torch",
              "optimizer": "sgd", "lr": 1e30, "data_dir": str(data_dir), "augment": False}
    ends = launch(W.train_rank, 2, (fields, str(tmp_path / "run")), timeout_s=300)
    print(ends)
    assert ends[0].startswith("DivergenceError") and ends[0] == ends[1]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "diverged"
