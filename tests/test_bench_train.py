"""`bnlab bench train`: bnlab's trainer beside a plain PyTorch loop, every row naming its
precision and memory format; the bf16 rows exist (and run) on any CPU. Speed is measured by
the command, never asserted here."""

from __future__ import annotations

import json

from bnlab.cli import main


def test_bench_train_rows_name_precision_and_memory_format(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--width", "0.125", "--batch-size", "8", "--steps", "1",
                 "--rounds", "1", "--cpu-only", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    print(text)
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    plain = rows["plain PyTorch loop"]
    assert (plain["precision"], plain["memory_format"], plain["speedup"]) == (
        "fp32", "contiguous", 1.0)
    expected = {f"bnlab trainer, {engine}, {precision}, channels_last"
                for engine in ("autograd", "manual") for precision in ("fp32", "bf16")}
    expected.add("bnlab trainer, autograd, fp32, contiguous")
    assert set(rows) - {"plain PyTorch loop"} == expected
    for name, row in rows.items():
        assert row["precision"] in name or name == "plain PyTorch loop"
        assert row["memory_format"] in name or name == "plain PyTorch loop"
        assert row["speedup"] == plain["step_ms"] / row["step_ms"]
        assert row["images_per_s"] == 8 / (row["step_ms"] / 1e3)
        assert row["variant"] in text or row["variant"][:20] in text
    assert rows["bnlab trainer, manual, bf16, channels_last"]["precision_reason"].startswith(
        "bf16 requested: bfloat16 autocast")
    assert "precision auto here:" in text
