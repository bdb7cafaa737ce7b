"""The run-folder format (bnlab.runs): atomic writes, the checkpoint's format version."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab import runs


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    runs.atomic_write_json(path, {"a": 1})
    runs.atomic_write_json(path, {"a": 2, "é": "é"}, ensure_ascii=False)
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "é": "é"}
    assert "é" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_checkpoint_carries_its_format_version(tmp_path):
    runs.save_checkpoint(tmp_path, {"metrics": [{"epoch": 1}], "w": torch.ones(2)})
    state = runs.load_checkpoint(tmp_path)
    assert state["format_version"] == runs.CHECKPOINT_FORMAT
    assert torch.equal(state["w"], torch.ones(2)) and state["metrics"] == [{"epoch": 1}]


def test_a_checkpoint_without_a_version_is_format_1_and_a_newer_one_is_refused(tmp_path):
    torch.save({"metrics": []}, tmp_path / runs.CHECKPOINT)  # written before versions
    assert runs.load_checkpoint(tmp_path)["metrics"] == []
    torch.save({"format_version": runs.CHECKPOINT_FORMAT + 1}, tmp_path / runs.CHECKPOINT)
    with pytest.raises(runs.ReportError, match=f"format {runs.CHECKPOINT_FORMAT + 1}"):
        runs.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint\.pt"):
        runs.load_checkpoint(tmp_path / "elsewhere")


def test_metrics_round_trip_and_a_cut_last_line_is_skipped(tmp_path):
    rows = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.1 * e, "test_loss": 2.0,
             "test_acc": 0.5} for e in (1, 2)]
    runs.write_metrics(tmp_path, rows[:1])
    runs.append_metrics(tmp_path, rows[1])
    assert runs.read_metrics(tmp_path / runs.METRICS) == rows
    with open(tmp_path / runs.METRICS, "a") as f:
        f.write('{"epoch": 3, "train_lo')
    notes: list[str] = []
    with pytest.warns(RuntimeWarning, match="incomplete"):
        assert runs.read_metrics(tmp_path / runs.METRICS, notes) == rows
    assert len(notes) == 1
    assert runs.read_metrics(tmp_path / "absent.jsonl") == []
