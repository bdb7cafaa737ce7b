"""The ``bnlab`` command's error boundary: every mistake a user can make on the command line
or in the files it names, and every environmental failure, ends in one line on stderr that
names the value or file and what to do, with exit status 2 (the command line cannot run as
given) or 1 (the run failed); a traceback only with ``--debug``; Ctrl-C says how to continue.

Each kind is a table (tests as data), so a newly found member costs one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bnlab.cli import build_parser, commands, main
from tests.cifar_fixtures import write_cifar10_folder

TINY = ["--epochs", "1", "--width", "0.125", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)
    return root


@pytest.fixture(scope="module")
def comparison(data_dir, tmp_path_factory) -> Path:
    """One finished tiny comparison (case a, one seed, one epoch), copied by each test."""
    out = tmp_path_factory.mktemp("comparison") / "cmp"
    assert main(["compare", "--cases", "a", "--seeds", "1", *TINY, "--data-dir", str(data_dir),
                 "--out", str(out), "--quiet"]) == 0
    return out


def no_work(monkeypatch, keep: tuple[str, ...] = ()) -> None:
    """Replace every subcommand's work by a failure: a refused command must not reach it
    (and a regression then fails fast instead of training on the embedded sample)."""
    def reached(args: argparse.Namespace) -> int:
        pytest.fail(f"bnlab {args.command} reached its work")

    for name in dir(commands):
        if name.startswith("cmd_") and name not in keep:
            monkeypatch.setattr(commands, name, reached)


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def one_line_error(capsys, command: str) -> str:
    """The stderr of a failed command: one line, ``bnlab COMMAND: error: ...``."""
    err = capsys.readouterr().err.strip()
    print(err)
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    assert err.startswith(f"bnlab {command}: error: "), err
    return err


# ---- kind 1: invalid values on the command line (exit 2, before any file or data) ----------

BAD_VALUES = {
    # compare: every numeric option, the case list, the device
    "compare seeds 0": ("compare --seeds 0", "--seeds", "'0'"),
    "compare epochs -3": ("compare --epochs -3", "--epochs", "'-3'"),
    "compare epochs 1.5": ("compare --epochs 1.5", "--epochs", "'1.5'"),
    "compare subset 0": ("compare --subset 0", "--subset", "'0'"),
    "compare width 0": ("compare --width 0", "--width", "'0'"),
    "compare width nan": ("compare --width nan", "--width", "'nan'"),
    "compare lr inf": ("compare --lr inf", "--lr", "'inf'"),
    "compare lr -1": ("compare --lr -1", "--lr", "'-1'"),
    "compare batch 0": ("compare --batch-size 0", "--batch-size", "'0'"),
    "compare empty case": ("compare --cases a,", "--cases", "'a,'"),
    "compare device gpu": ("compare --device gpu", "--device", "'gpu'"),
    "compare device meta": ("compare --device meta", "--device", "'meta'"),
    "compare device cuda:99": ("compare --device cuda:99", "--device", "'cuda:99'"),
    # study
    "study seeds 0": ("study q1 --seeds 0", "--seeds", "'0'"),
    "study device gpu": ("study q5 --device gpu", "--device", "'gpu'"),
    "study unknown name": ("study q9", "q9", "q1"),
    # bench
    "bench bn repeats 0": ("bench bn --repeats 0", "--repeats", "'0'"),
    "bench engine steps 0": ("bench engine --steps 0", "--steps", "'0'"),
    "bench engine widths 0": ("bench engine --widths 1 0", "--widths", "'0'"),
    "bench engine batch 0": ("bench engine --batch-size 0", "--batch-size", "'0'"),
    "bench train rounds 0": ("bench train --rounds 0", "--rounds", "'0'"),
    "bench train steps 0": ("bench train --steps 0", "--steps", "'0'"),
    "bench train width -1": ("bench train --width -1", "--width", "'-1'"),
    "bench train batch 0": ("bench train --batch-size 0", "--batch-size", "'0'"),
    "bench data repeats 0": ("bench data --repeats 0", "--repeats", "'0'"),
    "bench data threads -1": ("bench data --threads -1", "--threads", "'-1'"),
    # the command itself
    "no command": ("", "COMMAND", "--help"),
    "unknown command": ("comapre", "comapre", "compare"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=BAD_VALUES.keys())
def test_bad_value_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    argv, *words = BAD_VALUES[case]
    no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here
    code = main(shlex.split(argv))
    err = capsys.readouterr().err.strip()
    print(err)
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("bnlab") and "error: " in err and "--help)" in err
    assert all(word in err for word in words), words
    assert not any(tmp_path.iterdir())


def test_cuda_is_refused_up_front_where_absent(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    no_work(monkeypatch)
    code = main(["compare", "--device", "cuda", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA is not available" in err and not (tmp_path / "x").exists()


def test_every_numeric_option_has_a_checking_type():
    """A bare ``int``/``float`` type lets 0, -1, nan or inf through to the work."""
    def leaves(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from leaves(child)

    bare = [f"{p.prog} {'/'.join(a.option_strings)}" for p in leaves(build_parser())
            for a in p._actions if a.type in (int, float)]
    assert not bare


# ---- kind 2: paths that cannot be used (exit 2, before any work) ---------------------------

def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root writes anywhere, except /sys)."""
    if getattr(os, "geteuid", lambda: 1)() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        tempfile.TemporaryDirectory(dir="/sys").cleanup()
    except OSError:
        return Path("/sys")
    pytest.skip("running as root with no read-only folder to test against")


BAD_PATHS = {
    "compare out under a file": ("compare --cases a --out {afile}/x", "--out", "is a file"),
    "compare out is a file": ("compare --cases a --out {afile}", "--out", "is a file"),
    "compare out read-only": ("compare --cases a --out {ro}/x", "--out", "cannot write"),
    "compare data-dir is a file": ("compare --cases a --data-dir {afile} --out {tmp}/o",
                                   "--data-dir", "is a file"),
    "compare data-dir missing": ("compare --cases a --data-dir {tmp}/none --out {tmp}/o",
                                 "--data-dir", "does not exist"),
    # these three are refused by the subcommand itself, after its cheap first check
    "compare resume not a comparison": ("compare --resume {tmp}", "compare.json", "{tmp}"),
    "study out under a file": ("study q5 --out {afile}/x", "--out", "is a file"),
    "study out read-only": ("study q5 --out {ro}/x", "--out", "cannot write"),
    "study data-dir is a file": ("study q5 --data-dir {afile} --out {tmp}/o", "--data-dir",
                                 "is a file"),
    "study render not a study": ("study q1 --render {tmp}", "summary.json", "{tmp}"),
    "report not a comparison": ("report {tmp}", "compare.json", "{tmp}"),
    "report read-only folder": ("report {ro}", "cannot write", "{ro}"),
    "bench json is a folder": ("bench data --json {tmp}", "--json", "is a folder"),
    "bench json under a file": ("bench data --json {afile}/x.json", "--json", "is a file"),
    "bench json folder missing": ("bench bn --json {tmp}/none/x.json", "--json",
                                  "does not exist"),
    "bench json read-only": ("bench engine --json {ro}/x.json", "--json", "cannot write"),
}


@pytest.mark.parametrize("case", BAD_PATHS, ids=BAD_PATHS.keys())
def test_unusable_path_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    template, *words = BAD_PATHS[case]
    no_work(monkeypatch, keep=("cmd_compare", "cmd_study", "cmd_report")
            if "not a" in case else ())
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    places = {"tmp": tmp_path, "afile": afile}
    if "{ro}" in template:
        places["ro"] = read_only_folder(tmp_path)
    before = files_under(tmp_path)
    code = main(shlex.split(template.format(**places)))
    err = one_line_error(capsys, template.split()[0] + (" " + template.split()[1]
                                                       if template.startswith("bench") else ""))
    assert code == 2
    assert all(word.format(**places) in err for word in words), words
    assert files_under(tmp_path) == before


# ---- kind 3: corrupt run files and failures during a run (exit 1) --------------------------

def garbage_first_metrics_line(out: Path) -> None:
    path = out / "a" / "seed0" / "metrics.jsonl"
    path.write_text("{garbage\n" + path.read_text())


def garbage_json(name: str):
    def corrupt(out: Path) -> None:
        (out / name).write_text("[1,")
    return corrupt


def empty_json(name: str):
    def corrupt(out: Path) -> None:
        (out / name).write_text("{}")
    return corrupt


def compare_without(key: str):
    def corrupt(out: Path) -> None:
        saved = json.loads((out / "compare.json").read_text())
        del saved[key]
        (out / "compare.json").write_text(json.dumps(saved))
    return corrupt


def report_html_is_a_folder(out: Path) -> None:
    (out / "report.html").unlink()
    (out / "report.html").mkdir()


def unfinished_with_garbage_checkpoint(out: Path) -> None:
    (out / "a" / "seed0" / "result.json").unlink()
    (out / "a" / "seed0" / "checkpoint.pt").write_bytes(b"not a checkpoint")


# (corruption, command, words the one line must hold); {out} is the corrupted copy
CORRUPT = {
    "metrics.jsonl garbage line": (garbage_first_metrics_line, "report {out}",
                                   ["metrics.jsonl", "line 1"]),
    "config.json garbage": (garbage_json("a/seed0/config.json"), "report {out}",
                            ["a/seed0/config.json"]),
    "result.json garbage": (garbage_json("a/seed0/result.json"), "report {out}",
                            ["a/seed0/result.json"]),
    "compare.json garbage (report)": (garbage_json("compare.json"), "report {out}",
                                      ["compare.json"]),
    "report.html is a folder": (report_html_is_a_folder, "report {out}",
                                ["report.html", "folder"]),
    "compare.json garbage (resume)": (garbage_json("compare.json"),
                                      "compare --resume {out} --quiet",
                                      ["compare.json", "JSON"]),
    "compare.json {} (resume)": (empty_json("compare.json"), "compare --resume {out} --quiet",
                                 ["compare.json", "'cases'"]),
    "compare.json {} (report)": (empty_json("compare.json"), "report {out}",
                                 ["compare.json", "'cases'"]),
    "compare.json without configs (resume)": (compare_without("configs"),
                                              "compare --resume {out} --quiet",
                                              ["compare.json", "'configs'"]),
    "checkpoint.pt garbage (resume)": (unfinished_with_garbage_checkpoint,
                                       "compare --resume {out} --quiet",
                                       ["a/seed0/checkpoint.pt", "corrupt", "delete it"]),
}


@pytest.mark.parametrize("case", CORRUPT, ids=CORRUPT.keys())
def test_corrupt_run_file_is_one_line_exit_1(case, comparison, tmp_path, capsys):
    corrupt, template, words = CORRUPT[case]
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    corrupt(out)
    code = main(shlex.split(template.format(out=out)))
    err = one_line_error(capsys, template.split()[0])
    assert code == 1
    assert all(word in err for word in words), words


def failing_report(error: BaseException):
    def cmd_report(args: argparse.Namespace) -> int:
        raise error
    return cmd_report


def test_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import errno

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "summary.json"))
    monkeypatch.setattr(commands, "cmd_report", failing_report(full))
    assert main(["report", str(tmp_path)]) == 1
    err = one_line_error(capsys, "report")
    assert "summary.json" in err and "disk is full" in err


def test_out_of_memory_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def cmd_report(args: argparse.Namespace) -> int:
        torch.empty(2**60, dtype=torch.uint8)  # a real allocation failure, nothing touched
        return 0

    monkeypatch.setattr(commands, "cmd_report", cmd_report)
    assert main(["report", str(tmp_path)]) == 1
    assert "out of memory: lower --batch-size" in one_line_error(capsys, "report")


def test_a_bug_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "cmd_report", failing_report(KeyError("oops")))
    assert main(["report", str(tmp_path)]) == 1
    err = one_line_error(capsys, "report")
    assert "unexpected KeyError" in err and "--debug" in err
    for argv in (["--debug", "report", str(tmp_path)], ["report", str(tmp_path), "--debug"]):
        with pytest.raises(KeyError, match="oops"):
            main(argv)


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path):
    from bnlab.runs import ReportError

    (tmp_path / "compare.json").write_text("{")
    with pytest.raises(ReportError, match=r"compare\.json"):
        main(["compare", "--resume", str(tmp_path), "--debug"])


# ---- Ctrl-C --------------------------------------------------------------------------------

# Enough epochs that the run cannot finish between the first epoch's line and the signal (with
# 3, a full suite on a quiet machine once saw the run end with 0 before SIGINT arrived).
EPOCHS_TO_INTERRUPT = 12


def test_ctrl_c_says_how_to_continue_and_the_command_does(data_dir, tmp_path):
    """SIGINT to a real ``bnlab compare`` mid-run: exit 130, and the command it prints
    finishes the comparison."""
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnlab", "compare", "--cases", "b", "--seeds", "1", "--epochs",
         str(EPOCHS_TO_INTERRUPT), "--width", "0.125", "--batch-size", "8", "--device", "cpu",
         "--data-dir",
         str(data_dir), "--out", str(out), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "b" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted (machine too fast)")
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    print(err)
    assert proc.returncode == 130 and "Traceback" not in err
    command = err.strip().splitlines()[-1].strip()
    assert command == f"bnlab compare --resume {shlex.quote(str(out))}"
    assert main([*shlex.split(command)[1:], "--quiet"]) == 0
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS_TO_INTERRUPT + 1))


def test_ctrl_c_in_a_study_names_its_folder(tmp_path, capsys, monkeypatch):
    from bnlab import studies

    def interrupted(name, out, **kwargs):
        Path(out).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(studies, "run_study", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["study", "q1", "--preset", "quick", "--seeds", "2", "--quiet"]) == 130
    err = capsys.readouterr().err
    command = shlex.split(err.strip().splitlines()[-1])
    out = next(tmp_path.glob("runs/study-q1-quick-*"))
    assert command[:3] == ["bnlab", "study", "q1"] and "--resume" in command
    assert command[command.index("--resume") + 1] == str(out.relative_to(tmp_path))
    assert command[command.index("--seeds") + 1] == "2"


def test_ctrl_c_before_any_folder_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "cmd_report", failing_report(KeyboardInterrupt()))
    assert main(["report", str(tmp_path)]) == 130
    assert "interrupted (nothing to continue)" in capsys.readouterr().err


# ---- resume: as planned, one process at a time, nothing half-drawn -------------------------

RESUME_CONFLICTS = {
    "epochs and cases": ("--epochs 5 --cases a,b,c,d", ["--epochs 5", "--cases a,b,c,d"]),
    "seeds": ("--seeds 3", ["--seeds 3 (the comparison has 1)"]),
    "preset": ("--preset paper", ["--preset paper"]),
    "width and lr": ("--width 0.5 --lr 0.1", ["--width 0.5", "--lr 0.1"]),
    "out": ("--out {tmp}/elsewhere", ["--out"]),
}


@pytest.mark.parametrize("case", RESUME_CONFLICTS, ids=RESUME_CONFLICTS.keys())
def test_resume_refuses_flags_that_change_the_comparison(case, comparison, tmp_path, capsys):
    flags, words = RESUME_CONFLICTS[case]
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    before = {p: p.stat().st_mtime_ns for p in files_under(out)}
    code = main(["compare", "--resume", str(out), *shlex.split(flags.format(tmp=tmp_path))])
    err = one_line_error(capsys, "compare")
    assert code == 2 and all(word in err for word in words), words
    assert {p: p.stat().st_mtime_ns for p in files_under(out)} == before


def test_resume_accepts_flags_equal_to_the_saved_ones(comparison, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    assert main(["compare", "--resume", str(out), "--cases", "a", "--seeds", "1", "--epochs",
                 "1", "--width", "0.125", "--device", "cpu", "--quiet"]) == 0


def test_study_resume_without_a_folder_never_starts_a_new_study(tmp_path, capsys, monkeypatch):
    from bnlab import studies

    monkeypatch.setattr(studies, "run_study", lambda *a, **k: pytest.fail("a study started"))
    monkeypatch.chdir(tmp_path)
    assert main(["study", "q1", "--resume"]) == 2
    assert "--resume needs the study folder" in one_line_error(capsys, "study")
    assert main(["study", "q1", "--resume", str(tmp_path / "none")]) == 2
    assert "no such folder" in one_line_error(capsys, "study")
    assert not any(tmp_path.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["study", "q1", "--resume", str(empty)]) == 2
    assert "not a study folder" in one_line_error(capsys, "study")
    assert not any(empty.iterdir())


def test_study_resume_refuses_a_comparison_folder(comparison, tmp_path, capsys, monkeypatch):
    from bnlab import studies

    monkeypatch.setattr(studies, "run_study", lambda *a, **k: pytest.fail("a study started"))
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["study", "q1", "--resume", str(out)]) == 2
    assert f"bnlab compare --resume {out}" in one_line_error(capsys, "study")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_study_resume_refuses_other_settings(tmp_path, capsys, monkeypatch):
    from bnlab import studies

    monkeypatch.setattr(studies, "run_study", lambda *a, **k: pytest.fail("a study started"))
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(
        {"study": "q1", "preset": "quick", "seeds": 2, "data_dir": None}))
    assert main(["study", "q2", "--resume", str(folder), "--seeds", "3"]) == 2
    err = one_line_error(capsys, "study")
    assert "study q2 (the folder holds q1)" in err and "--seeds 3 (the study has 2)" in err


def test_a_second_process_is_kept_out_of_a_folder_in_use(comparison, tmp_path, capsys):
    """A lock of a live process (here our parent's PID) refuses the second resume."""
    import socket

    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    (out / "a" / "seed0" / "result.json").unlink()  # something left to train
    lock = out / ".bnlab.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                "started": time.time(), "what": "running a comparison"}))
    assert main(["compare", "--resume", str(out), "--quiet"]) == 1
    err = one_line_error(capsys, "compare")
    assert "in use" in err and str(os.getppid()) in err and str(out) in err
    assert lock.exists() and not (out / "a" / "seed0" / "result.json").exists()


def test_a_stale_lock_is_replaced_and_the_lock_is_removed_after(comparison, tmp_path):
    import socket

    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = out / ".bnlab.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                "started": time.time(), "what": "running a comparison"}))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        assert main(["compare", "--resume", str(out), "--quiet"]) == 0
    assert not lock.exists()


def test_a_run_killed_before_its_plot_gets_it_on_report_and_on_resume(comparison, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    curves = out / "a" / "seed0" / "curves.png"
    curves.unlink()
    assert main(["report", str(out)]) == 0
    assert curves.stat().st_size > 0
    curves.unlink()
    assert main(["compare", "--resume", str(out), "--quiet"]) == 0
    assert curves.stat().st_size > 0


def wrong_study_summary(folder: Path) -> None:
    (folder / "summary.json").write_text(json.dumps({"seeds": 2, "data": "x"}))


BAD_SUMMARIES = {
    "garbage": (lambda folder: (folder / "summary.json").write_text("[1,"), "JSON"),
    "empty object": (lambda folder: (folder / "summary.json").write_text("{}"), "not a complete"),
    "a list": (lambda folder: (folder / "summary.json").write_text("[]"), "JSON object"),
    "another study's": (wrong_study_summary, "not a complete"),
}


@pytest.mark.parametrize("name", ["q1", "q2", "q4", "all"])
@pytest.mark.parametrize("case", BAD_SUMMARIES, ids=BAD_SUMMARIES.keys())
def test_study_render_of_a_bad_summary_is_one_line(case, name, tmp_path, capsys):
    corrupt, word = BAD_SUMMARIES[case]
    corrupt(tmp_path)
    assert main(["study", name, "--render", str(tmp_path)]) == 1
    err = one_line_error(capsys, "study")
    assert "summary.json" in err and word in err


@pytest.mark.parametrize("args", [
    ["compare", "--preset", "nope"], ["compare", "--cases", "a,z"], ["compare", "--cases", "a,a"],
    ["compare", "--out", "{existing}"], ["study", "q1", "--out", "{existing}"],
])
def test_plan_and_folder_mistakes_are_named_before_the_data_loads(args, tmp_path, capsys,
                                                                   monkeypatch):
    """No download attempt, no data notice: the one line is the mistake, at once."""
    import bnlab.data

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the plan was checked")

    monkeypatch.setattr(bnlab.data, "load_cifar10", no_data)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    args = [a.replace("{existing}", str(existing)) for a in args]
    assert main([*args, "--quiet"]) == 2
    one_line_error(capsys, args[0])
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]


def test_a_busy_comparison_is_refused_before_the_data_loads(comparison, tmp_path, capsys,
                                                            monkeypatch):
    import socket

    import bnlab.data

    monkeypatch.setattr(bnlab.data, "load_cifar10",
                        lambda *a, **k: pytest.fail("the data was loaded for a busy folder"))
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    (out / ".bnlab.lock").write_text(json.dumps({
        "pid": os.getppid(), "host": socket.gethostname(), "started": time.time(),
        "what": "running a comparison"}))
    assert main(["compare", "--resume", str(out), "--quiet"]) == 1
    assert "in use" in one_line_error(capsys, "compare")


@pytest.mark.parametrize(("preset", "case", "fix"), [
    ("post-quick", "b-renorm", "use --preset quick or smoke or paper"),
    ("quick", "b-act", "use --preset post or post-quick"),
])
def test_a_case_under_a_preset_of_another_network_names_the_presets(preset, case, fix,
                                                                    tmp_path, capsys):
    assert main(["compare", "--preset", preset, "--cases", f"a,{case}", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = one_line_error(capsys, "compare")
    assert f"case {case} does not run under preset {preset}: {fix}" in err
    assert "arch" not in err and "norm_kind" not in err
    assert not (tmp_path / "out").exists()


def test_a_torn_last_metrics_line_is_a_one_line_warning(comparison, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    metrics = out / "a" / "seed0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "train_lo')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "bnlab", "report", str(out)], env=env,
                          capture_output=True, text=True)  # pytest would catch the warning
    err = done.stderr.strip()
    print(err)
    assert done.returncode == 0
    assert err.startswith("bnlab: warning: ") and "line 2 is incomplete" in err
    assert err.count("\n") == 0 and "RuntimeWarning" not in err and ".py" not in err


def test_resume_of_a_missing_folder_says_so(tmp_path, capsys):
    assert main(["compare", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in one_line_error(capsys, "compare")


def test_a_data_dir_conflict_with_a_comparison_started_without_one_says_so():
    from bnlab.compare import resume_conflicts

    saved = {"cases": ["a"], "seeds": [0], "preset": "quick",
             "configs": {"a": {"0": {"data_dir": None, "epochs": 1}}}}
    lines = resume_conflicts(saved, {"data_dir": "/data"})
    assert lines == ["--data-dir /data (the comparison was started without it)"]


def test_study_render_of_a_comparison_points_to_report(comparison, capsys):
    assert main(["study", "q1", "--render", str(comparison)]) == 2
    assert f"bnlab report {comparison}" in one_line_error(capsys, "study")
