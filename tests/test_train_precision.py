"""Mixed precision in the trainer: ``precision="auto"`` is the default and resolves from what
PyTorch reports of the device (simulated here, on a CPU with and without bfloat16); a bf16 run
trains on CPU with both engines, records what ran and why; the manual engine's bf16 step
follows the autograd engine's autocast step.

Tolerances (bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2**-9
relative, two roundings one ulp apart differ by 2**-8). With the same BN (bnlab's) in both
engines, both round the same tensors at the same places: the weights after three Adam steps
agree to float32 rounding, <= 1e-3 of what bfloat16 itself changes against float32 (1e-5
measured). With PyTorch's BN in the autograd engine (case b against b-manual), the two BN
kernels' float32 results differ in their last bits, round to bfloat16 one ulp apart here and
there, and such flips propagate (Adam's first steps, ~lr * sign(g), amplify them): the
manual engine is then held to the noise bfloat16 makes, its distance to autocast <= 0.9 of
autocast's distance to float32 (0.74 measured). Each check has a control that must fail it:
the manual engine in float32 sits at 1.0.
"""

from __future__ import annotations

import json

import pytest
import torch

from bnlab import train as T
from bnlab.cases import PRESETS, case_config
from bnlab.data import load_cifar10_dir
from bnlab.manual import Conv2d
from tests.cifar_fixtures import write_cifar10_folder

TINY = {"width": 0.125, "epochs": 1, "batch_size": 8, "device": "cpu", "eval_batch_size": 16,
        "lr": 1e-3, "lr_schedule": "constant"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    return load_cifar10_dir(root)


def _cpu_has_bf16(monkeypatch, fast: bool) -> None:
    """Simulate PyTorch's CPU capability report (what bnlab.precision asks)."""
    caps = {"amx_bf16": fast, "avx512_bf16": False, "avx2": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps), raising=False)


def test_auto_is_the_default_everywhere():
    assert T.TrainConfig().precision == "auto"
    for preset in PRESETS:
        assert case_config("b", preset).precision == "auto", preset
    with pytest.raises(T.ConfigError, match="precision must be one of auto, fp32, bf16, fp64"):
        T.TrainConfig(precision="half").validate()


def test_old_configs_still_load():
    """config.json files written before "auto" name fp32 (or bf16) explicitly."""
    for name in ("fp32", "bf16", "fp64"):
        assert T.TrainConfig.from_json({"precision": name}).validate().precision == name
    saved = {**T.TrainConfig(precision="fp32").to_json(), "data": "x", "device": "cpu",
             "bnlab_version": "0", "torch_version": "2"}
    assert T.TrainConfig.from_json(saved).precision == "fp32"


@pytest.mark.parametrize("engine", ["autograd", "manual"])
@pytest.mark.parametrize("fast", [False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def test_auto_resolves_from_the_cpu(monkeypatch, engine, fast):
    _cpu_has_bf16(monkeypatch, fast)
    case = "b" if engine == "autograd" else "b-manual"
    model = T.Model(case_config(case, "quick", **TINY), torch.device("cpu"))
    print(model.precision.reason)
    assert model.precision.requested == "auto"
    assert model.precision.name == ("bf16" if fast else "fp32")
    assert model.dtype == torch.float32  # master weights either way
    assert model.precision.reason.startswith(
        "auto: bfloat16 autocast, because this CPU has AMX-BF16" if fast
        else "auto: float32, because this CPU has")
    if engine == "autograd":
        assert model.autocast is fast
        assert all(p.dtype == torch.float32 for p in model.module.parameters())
    else:
        assert model.autocast is False  # the manual engine casts by hand, not by autocast
        convs = [layer for _, layer in model.network if isinstance(layer, Conv2d)]
        assert convs and all(c.compute_dtype == (torch.bfloat16 if fast else None)
                             for c in convs)
        assert all(p.dtype == torch.float32 for p in model.network.parameters())


@pytest.mark.parametrize("case", ["b", "b-manual", "a"])
def test_bf16_trains_on_cpu_and_says_so(tiny_data, tmp_path, case):
    """Explicit bf16 runs on any CPU (emulated and slow without AVX512-BF16/AMX); the
    resolved precision and its reason are in config.json; masters and BN stats stay float32."""
    config = case_config(case, "quick", precision="bf16", **TINY)
    result = T.train(config, tmp_path / "run", dataset=tiny_data, progress=False,
                     log=lambda _: None)
    row = result.metrics[-1]
    assert row["train_loss"] == row["train_loss"] and 0.0 <= row["test_acc"] <= 1.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["precision"] == "bf16"
    resolved = saved["precision_resolved"]
    assert (resolved["name"], resolved["autocast_dtype"], resolved["param_dtype"]) == (
        "bf16", "bfloat16", "float32")
    assert resolved["reason"].startswith("bf16 requested: bfloat16 autocast")
    model = T.load_model(tmp_path / "run", "cpu")
    assert model.precision.name == "bf16"
    state = model.state_dict()
    floats = {k: v for k, v in state["model"].items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float32 for v in floats.values())
    assert any("running_mean" in k for k in floats) == (case != "a")  # BN stats in float32


def test_precision_is_recorded_for_auto(tiny_data, tmp_path, monkeypatch):
    _cpu_has_bf16(monkeypatch, False)
    T.train(case_config("b", "quick", **TINY), tmp_path / "run", dataset=tiny_data,
            progress=False, log=lambda _: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["precision"] == "auto"
    assert saved["precision_resolved"]["name"] == "fp32"
    assert saved["precision_resolved"]["reason"].startswith("auto: float32")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _steps(case: str, precision: str, batches, **fields) -> tuple[list[float], torch.Tensor]:
    """Train ``case`` from seed 0 on ``batches``; the losses and all weights, flattened."""
    model = T.Model(case_config(case, "quick", precision=precision,
                                **{**TINY, "width": 0.25, "batch_size": 32, **fields}),
                    torch.device("cpu"))
    losses = [model.step(x, y)[0].item() for x, y in batches]
    weights = model.state_dict()["model"]
    flat = torch.cat([weights[k].flatten().double() for k in sorted(weights)
                      if weights[k].is_floating_point() and "running" not in k])
    return losses, flat


@pytest.fixture(scope="module")
def three_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 3, 32, 32, generator=g).contiguous(
                 memory_format=torch.channels_last),
             torch.randint(0, 10, (32,), generator=g)) for _ in range(3)]


@pytest.fixture(scope="module")
def manual_runs(three_batches):
    """b-manual's three steps from seed 0 in bf16 by hand and in float32."""
    return {p: _steps("b-manual", p, three_batches) for p in ("bf16", "fp32")}


def test_manual_bf16_steps_are_autocast_with_the_same_bn(three_batches, manual_runs):
    """b-manual (bf16 by hand) against the autograd engine with the same BN (bnlab's) under
    torch.autocast, three Adam steps from seed 0: the same roundings at the same places, so
    the same weights up to float32 rounding, a tiny fraction (<= 1e-3; 1e-5 measured) of
    what bfloat16 changes against float32. The float32 manual engine, as a control, sits
    at 1.0: the check can tell bf16 by hand from none."""
    loss_a, w_a = _steps("b", "bf16", three_batches, norm="bnlab")
    _, w_f = _steps("b", "fp32", three_batches, norm="bnlab")
    (loss_m, w_m), (_, w_m32) = manual_runs["bf16"], manual_runs["fp32"]
    err, control = _rel(w_m, w_a) / _rel(w_a, w_f), _rel(w_m32, w_a) / _rel(w_a, w_f)
    print(f"weights after 3 steps, |manual - autocast| / |autocast - fp32|: bf16 by hand "
          f"{err:.1e}, float32 manual {control:.2f}; losses {loss_m} vs {loss_a}")
    assert err <= 1e-3 and control > 0.5
    for m, a in zip(loss_m, loss_a, strict=True):
        assert abs(m - a) <= 2.0**-8 * abs(a)


def test_manual_bf16_steps_follow_autograd_under_autocast(three_batches, manual_runs):
    """Case b (PyTorch's BN under autocast) against b-manual (bf16 by hand), three Adam
    steps from seed 0: closer to autocast than autocast is to float32 (<= 0.9 of it; 0.74
    measured; the float32 manual engine is at 1.0), see the module docstring."""
    loss_a, w_a = _steps("b", "bf16", three_batches)
    loss_f, w_f = _steps("b", "fp32", three_batches)
    (loss_m, w_m), (_, w_m32) = manual_runs["bf16"], manual_runs["fp32"]
    err, control = _rel(w_m, w_a) / _rel(w_a, w_f), _rel(w_m32, w_a) / _rel(w_a, w_f)
    print(f"weights after 3 steps, |manual - autocast| / |autocast - fp32|: bf16 by hand "
          f"{err:.2f}, float32 manual {control:.2f}; losses manual {loss_m}, autocast "
          f"{loss_a}, fp32 {loss_f}")
    assert err <= 0.9 < control
    for m, a, f in zip(loss_m, loss_a, loss_f, strict=True):
        assert abs(m - a) <= max(abs(a - f), 2.0**-8 * abs(a))


def test_compare_takes_precision_and_prints_it_with_its_summary(tmp_path, capsys):
    from bnlab.cli import main
    from tests.cifar_fixtures import write_cifar10_folder

    root = tmp_path / "cifar"
    write_cifar10_folder(root, per_batch=8, test=12)
    out = tmp_path / "cmp"
    args = ["--cases", "a,b", "--seeds", "2", "--epochs", "1", "--width", "0.125",
            "--batch-size", "8", "--device", "cpu", "--data-dir", str(root)]
    assert main(["compare", *args, "--precision", "bf16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "precision bf16 (bf16 requested: bfloat16 autocast" in text
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["precision"]] == ["bf16"]
    assert summary["precision"][0]["runs"] == 4
    tail = text[text.index("wrote "):]
    assert "Precision: bf16 (bf16 requested" in tail
    assert "a: final test acc" in tail and "b: final test acc" in tail
    (pair,) = summary["paired_differences"]
    assert f"{pair['higher']} − {pair['lower']}:" in tail and pair["verdict"] in tail
    assert main(["compare", "--resume", str(out), "--precision", "fp32"]) != 0
    assert "--precision fp32 (the comparison has bf16)" in capsys.readouterr().err
