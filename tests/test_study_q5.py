"""Q5 (exponentially weighted averages): the averages and BN statistics on cases with a known
answer, the momentum replay against real runs, and the study end to end on tiny generated
data (files, figures, the section drawn from the summary, resume after an interruption)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from bnlab import bnstats
from bnlab import data as bdata
from bnlab import train as T
from bnlab.data import load_cifar10_dir
from bnlab.functional import bias_corrected_running_stats
from bnlab.studies import q5
from bnlab.studies.common import StudyContext, StudyScale, read_summary
from bnlab.studies.q5 import experiment as q5_experiment
from bnlab.studies.q5 import replay as q5_replay
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

TINY = StudyScale("tiny", width=0.125, epochs=2, subset=None, batch_size=8, lr=1e-3, seeds=1,
                  budget_s=60.0, description="tests: 40 generated images, 2 epochs")


# ---- the averages ------------------------------------------------------------------------

def test_ewa_of_a_constant():
    c, beta, steps = 3.0, 0.9, 30
    series = torch.full((steps,), c, dtype=torch.float64)
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    raw = q5.ewa(series, beta)
    assert torch.allclose(raw, c * (1 - beta**t), rtol=1e-12)  # biased toward v_0 = 0
    assert torch.allclose(q5.ewa(series, beta, bias_correction=True), series, rtol=1e-12)
    # from another start value, correction removes that start too
    assert torch.allclose(q5.ewa(series, beta, bias_correction=True, initial=5.0), series,
                          rtol=1e-12)


def test_ewa_matches_the_recursion_on_a_random_series():
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v, want = torch.zeros(2, dtype=torch.float64), []
    for t in range(50):
        v = 0.8 * v + 0.2 * x[:, t]
        want.append(v.clone())
    assert torch.allclose(q5.ewa(x, 0.8), torch.stack(want, 1), rtol=1e-12)


@pytest.mark.parametrize("beta, threshold, want", [
    (0.9, 1 / math.e, 10), (0.9, 0.01, 44), (0.5, 0.01, 7), (0.5, 0.5, 2),
    (0.98, 1 / math.e, 50), (0.999, 0.01, 4603),
])
def test_steps_to_forget(beta, threshold, want):
    t = q5.steps_to_forget(beta, threshold)
    assert t == want
    assert beta**t < threshold <= beta ** (t - 1)


def test_steps_to_forget_refuses_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        q5.steps_to_forget(1.0, 0.01)


@pytest.mark.parametrize("error, tolerance, want", [
    ([0.5, 0.05, 0.2, 0.05, 0.01], 0.1, 4),
    ([0.01, 0.01], 0.1, 1),
    ([0.5, 0.01, 0.5], 0.1, None),
])
def test_settle_step(error, tolerance, want):
    assert q5.settle_step(error, tolerance) == want


def test_ewa_experiment_measures_the_computed_start_up():
    e = q5.ewa_experiment((0.5, 0.9), replicates=1000)
    for key, b in e["betas"].items():
        for th, computed in b["computed"].items():
            measured = b["measured"]["raw"][th]
            print(f"beta {key}, threshold {th}: computed {computed}, measured {measured}")
            assert abs(measured - computed) <= 2
            assert b["measured"]["corrected"][th] == 1
        assert b["noise_measured"] == pytest.approx(b["noise_formula"], rel=0.1)


# ---- BN statistics -----------------------------------------------------------------------

def test_population_statistics_are_algorithm_2():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn)
    batches = [torch.randn(4, 3, 2, 2) * 2 + 1 for _ in range(3)]
    got = bnstats.population_statistics(model, batches)
    means = torch.stack([b.mean((0, 2, 3)) for b in batches]).double()
    variances = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).double()
    assert torch.allclose(got[0][0], means.mean(0), rtol=1e-6)
    assert torch.allclose(got[0][1], variances.mean(0), rtol=1e-6)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, torch.ones(3))


def test_statistics_error():
    population = [(torch.tensor([1.0, -1.0]), torch.tensor([4.0, 1.0]))]
    assert bnstats.statistics_error(population, population) == (0.0, 0.0)
    off = [(torch.tensor([3.0, 0.0]), torch.tensor([2.0, 1.5]))]  # mean off by 1 std
    mean_error, var_error = bnstats.statistics_error(off, population)
    assert mean_error == pytest.approx(1.0) and var_error == pytest.approx(0.5)


def test_replay_recovers_other_momenta_from_known_batches():
    torch.manual_seed(0)
    batches = [(torch.randn(3), torch.rand(3) + 0.5) for _ in range(20)]
    replay = q5.RunningReplay([3], run_momentum=0.1, momenta=(0.3, None))
    run_mean, run_var = torch.zeros(3), torch.ones(3)
    want = {0.3: (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))}
    for mean, var in batches:
        run_mean = 0.9 * run_mean + 0.1 * mean  # what BN does, in float32
        run_var = 0.9 * run_var + 0.1 * var
        replay.update([(run_mean, run_var)])
        want[0.3] = tuple(0.7 * w + 0.3 * s.double() for w, s in zip(want[0.3], (mean, var),
                                                                      strict=True))
    got = replay.averages["0.3"][0]
    assert torch.allclose(got[0], want[0.3][0], atol=1e-5)
    assert torch.allclose(got[1], want[0.3][1], atol=1e-5)
    cumulative = replay.averages["cumulative"][0]
    assert torch.allclose(cumulative[0], torch.stack([m for m, _ in batches]).double().mean(0),
                          atol=1e-5)


def test_corrected_is_bias_corrected_running_stats():
    stats = [(torch.tensor([0.5]), torch.tensor([0.9]))]
    got = q5.corrected(stats, 3, 0.1)[0]
    want = bias_corrected_running_stats(stats[0][0], stats[0][1], 3, 0.1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("epochs", "steps", "want"), [
    (5, 23, (5, False)),     # quick: 44 epochs would be needed, far beyond 1.25 x 5
    (12, 79, (13, True)),    # standard: one more epoch reaches 1,027 steps
    (30, 390, (30, True)),   # paper: long enough already
    (2, 5, (2, False)),      # the tests' tiny scale
])
def test_run_epochs_lengthen_to_a_thousand_steps_only_when_cheap(epochs, steps, want):
    got = q5.run_epochs(epochs, steps)
    assert got == want
    assert got[1] == (got[0] * steps >= q5.MIN_STEPS)


def test_precise_epochs_spread_over_training():
    assert q5.precise_epochs(5) == [1, 3, 5]
    assert q5.precise_epochs(13) == [1, 7, 13]
    assert q5.precise_epochs(2) == [1, 2] and q5.precise_epochs(1) == [1]


def test_population_batches_are_augmented_as_in_training(dataset, tmp_path):
    config = T.TrainConfig(width=0.125, epochs=1, batch_size=8, device="cpu", norm="bnlab")
    probe = q5_replay._Probe(config, dataset, tmp_path, steps_per_epoch=5, window=5)
    again = q5_replay._Probe(config, dataset, tmp_path, steps_per_epoch=5, window=5)
    got = torch.cat(probe.population_batches)
    assert torch.equal(got, torch.cat(again.population_batches))  # fixed crops
    images = got.shape[0]
    g = torch.Generator().manual_seed(q5_replay._POPULATION_SEED)
    index = torch.randperm(dataset.num_train, generator=g)[:images]
    plain = bdata.normalize(dataset.train_images[index])
    assert got.shape == plain.shape and not torch.equal(got, plain)
    # the crops pad with black: some pixels are the normalized black of the plain images
    black = bdata.normalize(torch.zeros_like(dataset.train_images[:1]))
    assert (got == black).any() and torch.cat(probe._training_batches(False)).shape[0] == 40


# ---- the study end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    return load_cifar10_dir(root)


def _context(out, dataset) -> StudyContext:
    return StudyContext(out=out, scale=TINY, seeds=1, device="cpu", quiet=True,
                        log=lambda _: None, dataset=dataset)


@pytest.fixture(scope="module")
def study(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("q5")
    summary = q5.run(_context(out, dataset))
    return out, summary


def test_study_writes_summary_figures_and_runs(study):
    out, _ = study
    s = read_summary(out)
    for key in ("data", "preset", "seeds", "ewa", "bn_curves", "early", "momenta",
                "final_acc_population", "claims", "probe_steps", "precise"):
        assert key in s, key
    assert s["preset"] == "tiny" and s["seeds"] == 1 and s["n_seeds"] == 1
    assert s["seed_list"] == [0]
    for claim in s["claims"].values():
        assert claim["verdict"] in ("supported", "contradicted", "inconclusive")
    assert s["total_steps"] == 10 and s["window"] == 10 and s["probe_steps"] == list(range(1, 11))
    assert set(s["momenta"]) == {"0.01", "0.1", "0.5", "cumulative"}
    run_dir = out / "runs" / "bn-seed0"
    for name in ("result.json", "probes.jsonl", "final.json", "replay-epoch1.pt",
                 "replay-epoch2.pt", "precise.jsonl"):
        assert (run_dir / name).is_file(), name
    # the run's own epoch metrics use the raw running statistics of momentum 0.1: the same
    # number as the replay of momentum 0.1 evaluated on the whole test set
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert s["momenta"]["0.1"]["acc_raw"]["mean"] == pytest.approx(metrics[-1]["test_acc"])
    # at step 1 the raw running variance still holds 0.9 of its initial 1: correction helps
    assert s["first_step"]["var_error_corrected"]["mean"] < s["first_step"]["var_error_raw"]["mean"]
    assert s["claims"]["bias_correction"]["verdict"] == "inconclusive"  # one seed
    # precise BN at the end of epochs 1 and 2; the moving average there is what the run's
    # own evaluation used, on the same test images
    assert [p["epoch"] for p in s["precise"]] == [1, 2]
    assert [p["step"] for p in s["precise"]] == [5, 10]
    assert s["precise"][-1]["acc_running"]["mean"] == pytest.approx(metrics[-1]["test_acc"])
    assert s["precise"][0]["acc_running"]["mean"] == pytest.approx(metrics[0]["test_acc"])
    # 10 steps: far from the 1,000 a momentum sweep needs
    assert not s["long_enough"] and s["claims"]["default_momentum"]["verdict"] == "inconclusive"
    assert s["momenta"]["0.01"]["start_weight"] == pytest.approx(0.99 ** 10)
    for png in ("q5_ewa_series.png", "q5_ewa_startup.png", "q5_bn_running_error.png",
                "q5_bn_early_accuracy.png", "q5_momentum_accuracy.png", "q5_precise_bn.png"):
        assert is_png(out / png)


def test_section_is_drawn_from_the_summary(study):
    out, _ = study
    text = q5.render(out)
    assert text.startswith(f"## {q5.TITLE}") and "Q5" in text.splitlines()[0]
    figures = section_figures(text)
    assert len(figures) == 6 and all((out / f).is_file() for _, f in figures)
    s = read_summary(out)
    assert f"{s['early']['var_error_raw']['mean']:.3f}" in text
    assert f"{s['final_acc_population']['mean']:.3f}" in text
    assert f"| 0.9 | 0.1 | {s['ewa']['betas']['0.9']['computed']['0.367879']} |" in text
    assert s["data"] in text and "Inconclusive at this scale" in text
    assert "**Short.** The runs had 10 steps" in text
    assert f"0.01 still holds {0.99 ** 10:.2g}" in text


def test_replay_matches_runs_trained_with_that_momentum(study, dataset, tmp_path):
    """The premise of the momentum sweep: momentum changes the buffers, never the weights,
    and the replay from one run's buffers gives another momentum's buffers."""
    out, _ = study
    run_dir = out / "runs" / "bn-seed0"
    config = json.loads((run_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if k in T.TrainConfig.__dataclass_fields__}
    replay = torch.load(run_dir / "replay-epoch2.pt", weights_only=True)["averages"]
    base = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    for momentum in (0.5, None):
        other = T.TrainConfig.from_json({**config, "bn_momentum": momentum})
        T.train(other, tmp_path / f"m{momentum}", dataset=dataset, progress=False,
                log=lambda _: None)
        state = torch.load(tmp_path / f"m{momentum}" / "checkpoint.pt",
                           weights_only=True)["model"]
        for key, value in state.items():
            if "running" not in key and "num_batches" not in key:
                assert torch.equal(value, base[key]), key  # the same weights
        averages = replay["cumulative" if momentum is None else f"{momentum:g}"]
        for layer, (mean, var) in enumerate(averages, start=1):
            real_mean, real_var = state[f"bn{layer}.running_mean"], state[f"bn{layer}.running_var"]
            error = max((mean - real_mean.double()).abs().max().item() / real_mean.abs().max(),
                        (var - real_var.double()).abs().max().item() / real_var.abs().max())
            print(f"momentum {momentum}, bn{layer}: largest relative error {error:.2e}")
            assert error < 1e-4


def test_interrupted_run_resumes_with_the_same_result(study, dataset, tmp_path, monkeypatch):
    out, _ = study
    small = q5.ewa_experiment((0.9,), replicates=10)
    # not what this test is about
    monkeypatch.setattr(q5_experiment, "ewa_experiment", lambda: small)
    call = q5_replay._Probe.__call__

    def interrupted(self, model, epoch, step):
        if epoch == 2 and step == 2:
            raise KeyboardInterrupt
        call(self, model, epoch, step)

    monkeypatch.setattr(q5_replay._Probe, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        q5.run(_context(tmp_path, dataset))
    monkeypatch.setattr(q5_replay._Probe, "__call__", call)
    assert not (tmp_path / "runs" / "bn-seed0" / "result.json").exists()
    q5.run(_context(tmp_path, dataset))
    got = json.loads((tmp_path / "runs" / "bn-seed0" / "final.json").read_text())
    want = json.loads((out / "runs" / "bn-seed0" / "final.json").read_text())
    assert _close(got, want)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_run_without_final_is_refused(study, dataset, tmp_path):
    out, _ = study
    shutil.copytree(out / "runs", tmp_path / "runs")
    (tmp_path / "runs" / "bn-seed0" / "final.json").unlink()
    with pytest.raises(RuntimeError, match="delete it"):
        q5.run(_context(tmp_path, dataset))
