"""Q3 (what BN costs): the measurements on cases with a known answer, and the study end to end
on tiny generated data."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

import bnlab.data
import bnlab.train
from bnlab import bnstats
from bnlab.data import load_cifar10_dir
from bnlab.studies import SCALES, q3, run_study
from bnlab.studies.common import StudyScale
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

# ---- the plan ------------------------------------------------------------------------------

TINY = StudyScale("tiny-q3", width=0.125, epochs=1, subset=None, batch_size=8, lr=1e-3,
                  seeds=2, budget_s=60.0, description="tests: 40 generated images")


@pytest.mark.parametrize(("scale", "num_train", "expected", "skipped"), [
    # (batch, epochs, updates): toward 1,000 updates, capped at the plan's max_epochs
    (SCALES["quick"], 1500, [(2, 1, 750), (64, 1, 23), (256, 1, 5)], []),
    (SCALES["standard"], 5085,
     [(2, 1, 2542), (8, 2, 1270), (32, 3, 474), (64, 3, 237), (256, 3, 57)], []),
    (SCALES["paper"], 50000,
     [(2, 1, 25000), (8, 1, 6250), (32, 1, 1562), (128, 3, 1170), (256, 6, 1170)], []),
    (TINY, 40, [(2, 1, 20), (8, 1, 5), (32, 1, 1)], [256]),
])
def test_sweep_plan_aims_at_a_thousand_updates(scale, num_train, expected, skipped):
    points, left_out = q3.sweep_plan(scale, num_train)
    print([(p.batch_size, p.epochs, p.updates, p.enough_updates) for p in points])
    assert [(p.batch_size, p.epochs, p.updates) for p in points] == expected
    assert left_out == skipped
    for p in points:
        assert p.enough_updates == (p.updates >= q3.MIN_UPDATES)
        assert p.epochs <= q3.scale_plan(scale).max_epochs
        # lr = lr0 sqrt(B / B0): the factor the study applies to each network's tuned rate
        assert p.lr == pytest.approx(scale.lr * (p.batch_size / scale.batch_size) ** 0.5)
    base = next(p for p in points if p.batch_size == scale.batch_size)
    assert base.lr == scale.lr
    variants = {p.batch_size for p in points if p.variants}
    assert variants == set(q3.scale_plan(scale).variant_batch_sizes) - set(left_out)


def test_start_weight_is_what_the_running_average_still_holds():
    # issue 17: batch 256 with 21 updates still holds 11 % of its start
    assert q3.start_weight(0.1, 21) == pytest.approx(0.9 ** 21) and 0.10 < 0.9 ** 21 < 0.12
    assert q3.start_weight(None, 21) is None


@pytest.mark.parametrize(("low", "high", "want"), [
    (-0.02, 0.005, "supported"),      # a cost above 1 point is ruled out
    (0.02, 0.08, "contradicted"),     # the cost exceeds 1 point
    (-0.01, 0.03, "inconclusive"),    # the interval reaches past 1 point but not wholly
    (None, None, "inconclusive"),     # one seed: no interval
])
def test_no_worse_verdict_is_a_non_inferiority_test(low, high, want):
    assert q3.no_worse_verdict({"low": low, "high": high}, min_effect=0.01) == want


def test_short_runs_are_inconclusive_whatever_the_interval():
    strong = {"mean": 0.2, "low": 0.15, "high": 0.25, "n": 3}
    assert q3.judged(strong, "above", enough_updates=True) == "supported"
    assert q3.judged(strong, "below", enough_updates=True) == "contradicted"
    assert q3.judged(strong, "above", enough_updates=False) == "inconclusive"


def test_augmented_batches_cover_the_set_once_with_fixed_crops(tmp_path):
    write_cifar10_folder(tmp_path, per_batch=8, test=4)
    data = load_cifar10_dir(tmp_path)
    first = list(q3.augmented_train_batches(data, 16, channels_last=False))
    again = list(q3.augmented_train_batches(data, 16, channels_last=False))
    other = list(q3.augmented_train_batches(data, 16, channels_last=False, seed=1))
    assert [len(y) for _, y in first] == [16, 16, 8]
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == sorted(data.train_labels.tolist())
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))
    plain = bnlab.data.normalize(data.train_images)
    # cropped: not the stored images in any order (padding brings in black pixels)
    assert not torch.allclose(torch.cat([x for x, _ in first]).sum(), plain.sum())


def test_epoch_time_leaves_out_the_first_epoch():
    runs = [[{"epoch": 1, "t": 50.0}, {"epoch": 2, "t": 2.0}, {"epoch": 3, "t": 4.0}],
            [{"epoch": 1, "t": 60.0}, {"epoch": 2, "t": 6.0}]]
    stats = q3.epoch_time_stats(runs, "t")
    print(stats)
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(4.0)
    assert stats["std"] == pytest.approx(2.0) and stats["skipped_first"]
    one_epoch = q3.epoch_time_stats([[{"epoch": 1, "t": 5.0}]], "t")
    assert one_epoch["mean"] == 5.0 and not one_epoch["skipped_first"]


# ---- the statistics BN normalizes with ------------------------------------------------------

def float64_batches(x: torch.Tensor, size: int):
    return [(x[i:i + size], torch.zeros(len(x[i:i + size]), dtype=torch.long))
            for i in range(0, len(x), size)]


def two_bn_net() -> nn.Sequential:
    """BN → fixed 1x1 convolution mixing channels → BN, in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
        net[0].bias.copy_(torch.tensor([1.0, -1.0, 0.0]))
    return net


class Wrapped(nn.Module):
    """The same network, not an nn.Sequential: recompute_exact must cut forwards by hooks."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("path", ["segments", "prefixes (cache too small)", "prefixes (module)"])
def test_recompute_exact_is_the_population_statistics_layer_by_layer(path):
    g = torch.Generator().manual_seed(1)
    # channels with different means and scales; batches with different offsets, so that
    # statistics of batches differ from those of the whole set
    x = torch.randn(50, 3, 4, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 3.0, 0.2], dtype=torch.float64).view(1, 3, 1, 1) + 5.0
    x += torch.arange(50, dtype=torch.float64).view(50, 1, 1, 1) / 10
    net = two_bn_net()
    target, limit = {"segments": (net, 1 << 30), "prefixes (cache too small)": (net, 1000),
                     "prefixes (module)": (Wrapped(net), 1 << 30)}[path]
    assert bnstats.recompute_exact(target, lambda: float64_batches(x, 7),
                              cache_limit_bytes=limit) == 2
    # reference: layer 1 from the data, layer 2 from layer 1's eval-mode output
    mean1, var1 = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    with torch.no_grad():
        h = net[1]((x - mean1.view(1, 3, 1, 1)) / (var1.view(1, 3, 1, 1) + 1e-5).sqrt()
                   * net[0].weight.view(1, 3, 1, 1) + net[0].bias.view(1, 3, 1, 1))
    mean2, var2 = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    for got, want in ((net[0].running_mean, mean1), (net[0].running_var, var1),
                      (net[2].running_mean, mean2), (net[2].running_var, var2)):
        print(got.tolist(), want.tolist(), float((got - want).abs().max()))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(m.training for m in net.modules())  # the modes it had (training) restored


def test_recompute_cumulative_averages_batch_means_and_unbiased_variances():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, 4, 4, generator=g, dtype=torch.float64)
    x += torch.arange(40, dtype=torch.float64).view(40, 1, 1, 1) / 4  # batch means differ
    bn = nn.Sequential(nn.BatchNorm2d(3, momentum=0.1).double())
    assert bnstats.recompute_cumulative(bn, float64_batches(x, 10)) == 4
    chunks = x.split(10)
    want_mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    want_var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn[0].running_mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn[0].running_var, want_var, rtol=1e-12, atol=1e-12)
    assert bn[0].momentum == 0.1  # restored
    # the mean is exact (equal batches); the variance misses the spread of batch means
    torch.testing.assert_close(want_mean, x.mean((0, 2, 3)))
    population = x.var((0, 2, 3), unbiased=False)
    print("cumulative", want_var.tolist(), "population", population.tolist())
    assert (want_var < 0.5 * population).all()


def toy_classifier(num_classes: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """BN → global average pool: the logits are the normalized channel means. An image of
    class k has +3 on channel k, so with the right statistics argmax finds k."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(64) % num_classes
    x = torch.randn(64, num_classes, 4, 4, generator=g)
    x[torch.arange(64), labels] += 3.0
    net = nn.Sequential(nn.BatchNorm2d(num_classes, affine=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    return net, x, labels


def test_accuracy_running_vs_batch_statistics_and_recomputed():
    net, x, y = toy_classifier()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    bnstats.recompute_exact(net, lambda: batches)
    right = bnstats.accuracy(net, batches)
    bn = net[0]
    bn.running_mean[0] = -100.0  # wrong running statistics: channel 0 wins every image
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    wrong = bnstats.accuracy(net, batches)
    with_batch = bnstats.accuracy(net, batches, "batch")
    print(f"running (right) {right:.3f}  running (wrong) {wrong:.3f}  batch {with_batch:.3f}")
    assert right > 0.95 and with_batch > 0.95
    assert wrong == pytest.approx(0.25)  # only class 0 is right
    for key, value in bn.state_dict().items():  # the batch-statistics pass touched nothing
        torch.testing.assert_close(value, before[key])
    assert bn.training  # the mode it had
    bnstats.recompute_exact(net, lambda: batches)
    assert bnstats.accuracy(net, batches) == right  # recomputing repairs it
    mismatch = bnstats.stats_mismatch(net, net)
    assert mismatch == {"mean_shift": 0.0, "log_var_ratio": 0.0}


def test_accuracy_refuses_unknown_statistics():
    net, x, y = toy_classifier()
    with pytest.raises(ValueError, match="statistics"):
        bnstats.accuracy(net, [(x, y)], "population")


# ---- end to end ----------------------------------------------------------------------------

@contextlib.contextmanager
def tiny_study_env():
    """SCALES with TINY; no per-run curves.png (drawn by ``train``, ~1 s each, not what is
    tested here); one thread, since tiny tensors gain nothing from two and on a busy
    machine OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCALES, TINY.name, TINY)
        mp.setattr(bnlab.train, "_plot_run", lambda run_dir: None)
        torch.set_num_threads(1)
        try:
            yield mp
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study at the TINY scale (22 runs on 40 images), once for the tests below."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    dataset = load_cifar10_dir(root)
    out = tmp_path_factory.mktemp("q3") / "study"
    with tiny_study_env():
        summary = run_study("q3", out, preset=TINY.name, device="cpu", quiet=True,
                            log=lambda _: None, dataset=dataset)
    return out, summary, dataset


def test_study_writes_summary_figures_and_section(study):
    out, _, _ = study
    stored = json.loads((out / "summary.json").read_text())
    for key in ("data", "preset", "seeds", "settings", "tuning", "batch_size", "discrepancy",
                "class_sorted", "time", "claims", "figures"):
        assert key in stored, key
    assert stored["preset"] == TINY.name and stored["seeds"] == TINY.seeds
    assert stored["seed_list"] == list(range(TINY.seeds))
    assert stored["n_seeds"] == TINY.seeds
    assert "generated" not in stored["data"] and stored["data"]
    assert [p["batch_size"] for p in stored["batch_size"]["points"]] == [2, 8, 32]
    assert stored["batch_size"]["skipped"] == [256]
    for claim in stored["claims"].values():
        assert claim["verdict"] in ("supported", "contradicted", "inconclusive")
        if not claim.get("enough_updates", True):  # 1 to 20 updates here: nothing counts
            assert claim["verdict"] == "inconclusive", claim
    assert set(stored["claims"]) == {"time", "unrepresentative", "sorted_recovery",
                                     "small_batch", "train_test", "group", "renorm"}
    section = (out / "section.md").read_text()
    assert section.startswith(f"## {q3.TITLE}") and "Q3" in section.splitlines()[0]
    figures = [src for _, src in section_figures(section)]
    assert sorted(figures) == sorted(stored["figures"].values())
    for name in figures:
        assert is_png(out / name)
    assert (out / "report.html").is_file()
    assert section.count("**The data support it.**") + section.count(
        "**The data contradict it.**") + section.count(
        "**Inconclusive at this scale.**") == len(stored["claims"])
    assert "fewer than the 1000 this study asks for" in section


def test_each_network_trains_at_its_own_tuned_rate_scaled_by_sqrt_batch(study):
    out, _, _ = study
    stored = json.loads((out / "summary.json").read_text())
    tuned = {norm: stored["tuning"][norm]["best"] for norm in ("torch", "none")}
    for p in stored["batch_size"]["points"]:
        factor = (p["batch_size"] / TINY.batch_size) ** 0.5
        for key, rate in p["lr"].items():
            assert rate == pytest.approx(tuned["none" if key == "none" else "torch"] * factor)
            config = json.loads((out / "runs" / f"bs{p['batch_size']}-{key}-seed0" /
                                 "config.json").read_text())
            assert config["lr"] == pytest.approx(rate)
            assert config["epochs"] == p["epochs"]


def test_variants_beside_bn_paired_by_seed(study):
    out, _, _ = study
    stored = json.loads((out / "summary.json").read_text())
    points = {p["batch_size"]: p for p in stored["batch_size"]["points"]}
    # ghost BN over batches of 2 <= its virtual batch of 32 is BN: not trained
    assert points[2]["variants"] == ["group", "renorm"] and points[8]["variants"] == []
    for key in ("group", "renorm"):
        v = points[2][key]
        assert v["test_acc"]["n"] == TINY.seeds
        by_bn = {r["seed"]: r["test_acc"] for r in points[2]["torch"]["runs"]}
        diffs = [r["test_acc"] - by_bn[r["seed"]] for r in v["runs"]]
        assert v["vs_bn"]["values"] == pytest.approx(diffs)
        config = json.loads((out / "runs" / f"bs2-{key}-seed0" / "config.json").read_text())
        assert config["norm_kind"] == key


def test_section_numbers_come_from_the_summary(study):
    out, _, _ = study
    stored = json.loads((out / "summary.json").read_text())
    section = q3.render(out)
    assert section == (out / "section.md").read_text()  # redrawn from the files alone
    base = next(p for p in stored["batch_size"]["points"] if p["batch_size"] == 8)
    acc = base["torch"]["test_acc"]
    assert f"{acc['mean'] * 100:.1f} ± {acc['std'] * 100:.1f} %" in section
    exact = stored["discrepancy"]["groups"][0]["exact"]
    assert f"{exact['mean'] * 100:.1f} ± {exact['std'] * 100:.1f} %" in section
    time = stored["time"]["configs"]["autograd_torch"]["epoch_time_s"]
    assert f"{time['mean']:.2f} ± {time['std']:.2f}" in section
    assert f"{stored['time']['bn_parameter_fraction'] * 100:.2f} %" in section
    # the verdict in the text is the one in the summary
    verdict = stored["claims"]["time"]["verdict"]
    line = next(x for x in section.splitlines() if x.startswith("- **Time**"))
    assert q3.VERDICT_TEXT[verdict] in line


def test_study_discrepancy_is_measured_on_every_bn_network(study):
    out, _, _ = study
    stored = json.loads((out / "summary.json").read_text())
    groups = stored["discrepancy"]["groups"]
    assert [g["order"] for g in groups] == ["shuffled"] * 3 + ["class_sorted"]
    points = {p["batch_size"]: p for p in stored["batch_size"]["points"]}
    for g in groups[:3]:
        # eval mode with running averages is what training measured as test accuracy
        assert g["running"]["mean"] == pytest.approx(points[g["batch_size"]]["torch"]
                                                     ["test_acc"]["mean"])
        for key, _ in q3.STAT_KINDS:
            assert g[key]["n"] == TINY.seeds
        assert {s["seed"] for s in g["per_seed"]} == set(range(TINY.seeds))
        assert g["exact_augmented_vs_running"]["n"] == TINY.seeds


def test_resume_trains_nothing_again(study):
    """A second run of the study over its folder reuses every finished run."""
    out, summary, dataset = study
    calls = []
    real = bnlab.train.train

    def counting(config, run_dir, **kwargs):
        calls.append(run_dir)
        assert (run_dir / "result.json").is_file(), f"{run_dir} would be trained"
        return real(config, run_dir, **kwargs)

    with tiny_study_env() as mp:
        mp.setattr("bnlab.studies.common.train", counting)
        again = run_study("q3", out, preset=TINY.name, device="cpu", quiet=True,
                          log=lambda _: None, dataset=dataset, resume=True)
    assert len(calls) == len(list((out / "runs").iterdir())) == (summary["runs"]["trained"]
                                                           + 2 * TINY.tune_points * TINY.tune_seeds)
    assert again["batch_size"]["points"] == summary["batch_size"]["points"]
    assert again["discrepancy"]["groups"] == summary["discrepancy"]["groups"]
