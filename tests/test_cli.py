"""The ``bnlab`` command as a user meets it: help, gradcheck, compare, report, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.cli import build_parser, main
from tests.cifar_fixtures import write_cifar10_folder

TINY = ["--epochs", "2", "--width", "0.125", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)
    return root


def subcommands() -> list[list[str]]:
    parser = build_parser()
    found = []
    for action in parser._subparsers._group_actions:  # the COMMAND choices
        for name, sub in action.choices.items():
            found.append([name])
            for inner in getattr(sub, "_subparsers", None)._group_actions if sub._subparsers \
                    else []:
                found += [[name, n] for n in inner.choices]
    return found


@pytest.mark.parametrize("command", subcommands(), ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: bnlab" in capsys.readouterr().out


def test_compare_help_lists_presets_and_cases(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for word in ("quick", "paper", "a: no BN", "c: bnlab BN", "embedded"):
        assert word in text


def test_gradcheck_command(capsys):
    assert main(["gradcheck", "--fast", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm2d channels_last" in out and "pass" in out and "FAIL" not in out


def test_compare_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--cases", "a,b,c", "--seeds", "2", *TINY, "--data-dir",
                 str(data_dir), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr()
    for name in ("compare.json", "summary.json", "curves.png", "report.md", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for case in "abc":
        for seed in (0, 1):
            run = out / case / f"seed{seed}"
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["epoch"] for r in rows] == [1, 2]
            assert (run / "curves.png").is_file() and (run / "checkpoint.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert "not the full data set" in summary["data"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert "not the full data set" in (out / "report.md").read_text()
    health = json.loads((out / "init_health.json").read_text())
    assert {(r["norm"], r["init"]) for r in health["rows"]} >= {("none", "kaiming"),
                                                                 ("torch", "torch")}
    assert "## Initialization health" in (out / "report.md").read_text()

    # the report is redrawn from the files alone
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()


BAD = {
    "unknown case": (["--cases", "a,zz"], "zz"),
    "zero seeds": (["--cases", "a", "--seeds", "0"], "seeds"),
    "negative epochs": (["--cases", "a", "--epochs", "-3"], "epochs"),
    "unknown preset": (["--cases", "a", "--preset", "huge"], "huge"),
    "batch larger than data": (["--cases", "a", "--batch-size", "4096"], "batch size"),
    "bad lr": (["--cases", "a", "--lr", "0"], "lr"),
}


@pytest.mark.parametrize("case", BAD, ids=BAD.keys())
def test_bad_config_fails_before_any_file(case, data_dir, tmp_path, capsys):
    args, word = BAD[case]
    out = tmp_path / "out"
    code = main(["compare", *args, "--data-dir", str(data_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and word in err and "Traceback" not in err
    assert not out.exists()


def test_missing_data_dir_is_named(tmp_path, capsys):
    code = main(["compare", "--cases", "a", "--data-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "--data-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_folder_is_not_overwritten(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code = main(["compare", "--cases", "a", "--seeds", "1", *TINY, "--data-dir", str(data_dir),
                 "--out", str(out), "--quiet"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_resume_after_sigkill(data_dir, tmp_path):
    """Kill a real `bnlab compare` process mid-run; --resume ends where a whole run ends."""
    args = [sys.executable, "-m", "bnlab.cli", "compare", "--cases", "b", "--seeds", "1",
            "--epochs", "4", "--width", "0.125", "--batch-size", "8", "--device", "cpu",
            "--data-dir", str(data_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "cut")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "b" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-m", "bnlab.cli", "compare", "--resume",
                    str(tmp_path / "cut"), "--quiet"], check=True, env=env, capture_output=True)

    def rows(folder: str) -> list[dict]:
        path = tmp_path / folder / "b" / "seed0" / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    whole, cut = rows("whole"), rows("cut")
    assert [r["epoch"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(whole, cut, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == b[key], (a["epoch"], key)
