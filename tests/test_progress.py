"""What a person sees while a job trains (bnlab.progress), and the TensorBoard events of
``--tensorboard`` (bnlab.tensorboard), read back from the files."""

from __future__ import annotations

import io
import sys

import pytest

from bnlab import train as T
from bnlab.cases import PRESETS, case_config
from bnlab.data import load_cifar10_dir
from bnlab.progress import JobProgress, Progress, format_duration
from tests.cifar_fixtures import write_cifar10_folder

TINY = {"epochs": 2, "width": 0.125, "batch_size": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)
    return load_cifar10_dir(root)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("seconds", "text"), [(5, "5 s"), (89, "89 s"), (240, "4 min"),
                                               (7200, "2.0 h")])
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text


def test_the_bar_says_which_run_and_how_long_the_run_and_the_job_have_left(monkeypatch):
    """Run 2 of 3, epoch 1 of 2, 5 of 10 steps at 1 s a step: 15 s left in this run, and
    one more run of 20 steps: 35 s in all."""
    stderr = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stderr)
    clock = iter([0.0, 5.0, 5.0])
    monkeypatch.setattr("bnlab.progress.time.perf_counter", lambda: next(clock))
    job = JobProgress(3)
    job.start_run(2, 20)
    bar = Progress(True, "b seed 0 epoch 1/2", epoch=1, epochs=2, job=job)
    bar.update(5, 10, loss=1.5, acc=0.25, images_per_s=100.0)
    bar.close()
    shown = stderr.getvalue()
    print(shown)
    assert "run 2 of 3 · b seed 0 epoch 1/2" in shown
    assert "run about 15 s left" in shown and "all about 35 s left" in shown
    assert "loss 1.5000" in shown and "acc 0.2500" in shown


def test_the_bar_is_silent_off_a_terminal_and_when_quiet(monkeypatch):
    for stream, enabled in ((io.StringIO(), True), (FakeTTY(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = Progress(enabled, "b seed 0 epoch 1/1")
        bar.update(10, 10, 1.0, 0.5, 10.0)
        bar.close()
        assert stream.getvalue() == ""


def test_the_smoke_preset_is_seconds_and_says_its_numbers_mean_nothing():
    smoke = PRESETS["smoke"]
    assert "mean nothing" in smoke.description
    for case in smoke.cases:
        config = case_config(case, "smoke", seed=0).validate()
        assert config.epochs == 1 and config.subset <= 512 and config.width <= 0.25


def test_tensorboard_events_hold_every_epoch_and_every_bn_layer(tiny_data, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed "
                        "(pip install 'bnlab[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnlab.tensorboard import SCALARS, TensorBoardLogger

    for case in ("b", "c"):  # autograd + torch BN, manual engine + bnlab BN
        run_dir = tmp_path / case
        config = case_config(case, "quick", seed=0, **TINY)
        with TensorBoardLogger(run_dir) as logger:
            result = T.train(config, run_dir, dataset=tiny_data, progress=False,
                             log=lambda _: None, on_epoch=logger)
        events = EventAccumulator(str(run_dir / "tensorboard"),
                                  size_guidance={"histograms": 0, "scalars": 0})
        events.Reload()
        tags = events.Tags()
        assert set(SCALARS) <= set(tags["scalars"])
        test_acc = [(e.step, e.value) for e in events.Scalars("accuracy/test")]
        assert test_acc == [(m["epoch"], pytest.approx(m["test_acc"], abs=1e-6))
                            for m in result.metrics]
        model = T.load_model(run_dir, "cpu")
        n_bn = len(model.bn_layers())
        assert n_bn > 0
        for k in range(n_bn):
            for name in ("running_mean", "running_var", "gamma", "beta"):
                histogram = events.Histograms(f"bn{k}/{name}")
                assert [h.step for h in histogram] == [1, 2]
        # the last running_var histogram has one count per channel and its extremes
        last = events.Histograms("bn0/running_var")[-1].histogram_value
        running_var = model.bn_layers()[0]
        running_var = (running_var.buffers["running_var"] if case == "c"
                       else running_var.running_var)
        assert last.num == running_var.numel()
        assert last.min == pytest.approx(running_var.min().item(), rel=1e-6)
        assert last.max == pytest.approx(running_var.max().item(), rel=1e-6)
