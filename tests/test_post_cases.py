"""The post presets end to end: cases, the ladder, ``bnlab compare --preset post-quick``,
and the report's comparison with the post's logs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bnlab import train as T
from bnlab.cases import LADDER, PRESETS, case_config
from bnlab.cli import main
from bnlab.data import load_cifar10_dir
from bnlab.post.log import LOGGED_FINAL
from bnlab.post.report import post_section, post_summary
from bnlab.report import Run
from tests.cifar_fixtures import write_cifar10_folder

TINY = {"width": 0.125, "epochs": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=12, test=10)  # 60 training, 10 test images
    return root


def test_post_cases_are_what_the_post_ran():
    c = case_config("c", "post")
    assert (c.arch, c.recipe, c.engine, c.bn_kind, c.optimizer, c.amsgrad_rule) == \
        ("post", "post", "manual", "activation", "amsgrad", "post")
    assert set(c.gradient_errors) == {"elu", "pool", "loss"}
    assert (c.batch_size, c.lr, c.lr_schedule, c.betas, c.epochs) == \
        (50, 3e-4, "inverse", (0.9, 0.9), 21)
    fixed = case_config("c-fixed", "post")
    assert fixed.gradient_errors == () and fixed.amsgrad_rule == "torch"
    assert fixed.bn_kind == "activation"
    b = case_config("b", "post-quick")
    assert (b.arch, b.engine, b.norm, b.bn_kind) == ("post", "autograd", "torch", "channel")
    # outside the post presets, c is bnlab's standard case and the ladder steps are refused
    assert case_config("c", "quick").arch == "allcnn"
    with pytest.raises(T.ConfigError, match="ladder"):
        case_config("b-act", "quick")
    assert PRESETS["post-quick"].cases == ("a", "b", "c")
    assert set(LADDER) <= set(PRESETS["post"].cases)


def test_each_ladder_step_changes_one_thing():
    configs = [case_config(step, "post").to_json() for step in LADDER]
    for lower, upper in itertools.pairwise(configs):
        changed = {k for k in lower if lower[k] != upper[k]} - {"case"}
        print(upper["case"], changed)
        assert changed, upper["case"]
    # b → b-manual: the implementation only (engine, BN code, optimizer code)
    changed = {k for k in configs[0] if configs[0][k] != configs[1][k]} - {"case"}
    assert changed == {"engine", "norm", "optimizer_impl"}


def test_b_manual_follows_b_on_the_post_net(data_dir, tmp_path):
    """The post's subject, isolated: hand-written vs framework code, same math. In float64
    the two trajectories agree to rounding (1e-9 over 2 epochs of 2 steps each)."""
    data = load_cifar10_dir(data_dir)
    runs = {case: T.train(case_config(case, "post-quick", 0, precision="fp64", **TINY),
                          tmp_path / case, dataset=data, progress=False, log=lambda s: None)
            for case in ("b", "b-manual")}
    for a, b in zip(runs["b"].metrics, runs["b-manual"].metrics, strict=True):
        for key in ("train_loss", "test_loss", "test_acc"):
            assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(a[key])), (key, a, b)


def test_post_recipe_run_has_the_posts_step_count(data_dir, tmp_path):
    data = load_cifar10_dir(data_dir)
    cfg = case_config("c", "post-quick", 0, **{**TINY, "epochs": 1})
    seen = []
    T.train(cfg, tmp_path / "c", dataset=data, progress=False, log=lambda s: None,
            on_step=lambda model, epoch, step: seen.append(step))
    assert seen == [1, 2]  # 60 images, 25 originals per step: 2 steps, each image twice


def test_compare_post_quick_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compare", "--preset", "post-quick", "--epochs", "1", "--width", "0.125",
                 "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    for name in ("summary.json", "curves.png", "post_curves.png", "post_cost_scaled.png",
                 "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["post"]["cases"]) == {"a", "b", "c"}
    assert summary["post"]["cases"]["b"]["logged_final"] == LOGGED_FINAL["b"]
    report = (out / "report.md").read_text()
    for value in ("88.83", "89.39", "87.90"):
        assert value in report
    assert "cannot tell (fewer than 2 seeds)" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "88.83" in html


def _run(case: str, seed: int, final: float) -> Run:
    metrics = [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                "test_acc": final}]
    return Run(Path("x"), {"case": case, "seed": seed}, metrics, {"status": "finished"})


def test_post_summary_verdicts_and_paired_ladder():
    runs = {
        "a": [_run("a", 0, 0.880), _run("a", 1, 0.886), _run("a", 2, 0.890)],
        "b": [_run("b", 0, 0.881), _run("b", 1, 0.889), _run("b", 2, 0.887)],
        "b-manual": [_run("b-manual", 0, 0.882), _run("b-manual", 1, 0.890),
                     _run("b-manual", 2, 0.888)],
        "c": [_run("c", 0, 0.850), _run("c", 1, 0.851), _run("c", 2, 0.852)],
    }
    post = post_summary(runs)
    # a: mean 0.8853, s 0.00503, one new run within ±4.303·s·√(4/3) = ±0.0250
    a = post["cases"]["a"]
    print("a", a["prediction_interval"], "c", post["cases"]["c"]["prediction_interval"])
    assert a["prediction_interval"]["low"] == pytest.approx(0.8853333 - 0.0250064, abs=1e-6)
    assert a["logged_within_prediction"] is True                  # 0.8883 inside
    assert post["cases"]["c"]["logged_within_prediction"] is False  # 0.8790 above 0.852+0.005
    steps = {s["step"]: s for s in post["ladder"]}
    assert list(steps) == ["b-manual", "c"]  # b-act and b-act-rule were not run
    assert steps["b-manual"]["change"]["mean"] == pytest.approx(0.001)
    assert steps["b-manual"]["change"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert steps["c"]["change"]["values"] == pytest.approx([-0.032, -0.039, -0.036])
    assert steps["c"]["adds"] == ["b-act", "b-act-rule", "c"]  # lumped: say so
    claim = post["b_vs_a"]
    assert claim["bnlab_b_minus_a"]["values"] == pytest.approx([0.001, 0.003, -0.003])
    assert claim["verdict"] == "inconclusive"  # the interval holds zero
    assert claim["logged_within_prediction"] is True  # +0.0056 inside about ±0.0177
    text = post_section(post, "test data")
    assert "cannot separate b from a" in text and "88.83" in text
    assert "Verdict: **inconclusive**" in text
    assert "3 steps at once" in text
    assert "1.001e-5" in text and "m_{t-1}" in text  # the two ambiguities of the post's code


def test_b_beating_a_on_every_seed_is_supported_and_one_seed_is_inconclusive():
    runs = {"a": [_run("a", s, v) for s, v in enumerate((0.80, 0.82, 0.81))],
            "b": [_run("b", s, v) for s, v in enumerate((0.85, 0.871, 0.859))]}
    claim = post_summary(runs)["b_vs_a"]
    print("b - a", claim["bnlab_b_minus_a"])
    assert claim["verdict"] == "supported"
    assert "b beats a" in post_section(post_summary(runs), "test data")
    one = post_summary({"a": runs["a"][:1], "b": runs["b"][:1]})
    assert one["b_vs_a"]["verdict"] == "inconclusive"
    assert one["cases"]["a"]["prediction_interval"] is None
    assert "cannot tell (fewer than 2 seeds)" in post_section(one, "test data")


def test_per_activation_bn_is_refused_on_all_cnn_c():
    with pytest.raises(T.ConfigError, match="arch 'post'"):
        T.TrainConfig(bn_kind="activation").validate()
