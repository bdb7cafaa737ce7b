"""`precision=` resolves as documented, from what PyTorch reports of the device (simulated
here for machines with and without bfloat16), and PyTorch's BN keeps its statistics in
float32 under CPU autocast."""

from __future__ import annotations

import pytest
import torch

from bnlab import precision as P
from bnlab.precision import resolve_precision


def _cpu_flags(monkeypatch, amx: bool, avx512: bool) -> None:
    caps = {"amx_bf16": amx, "avx512_bf16": avx512, "avx2": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps), raising=False)


@pytest.mark.parametrize(("name", "dtype"), [("fp32", torch.float32), ("fp64", torch.float64)])
def test_explicit_full_precisions(name, dtype):
    p = resolve_precision(name, "cpu")
    assert (p.name, p.param_dtype, p.autocast_dtype, p.autocast_enabled) == (
        name, dtype, None, False)
    assert name in p.reason
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_auto_without_bf16_is_float32(monkeypatch):
    _cpu_flags(monkeypatch, amx=False, avx512=False)
    p = resolve_precision("auto", "cpu")
    print(p.reason)
    assert (p.name, p.requested, p.param_dtype, p.autocast_dtype) == (
        "fp32", "auto", torch.float32, None)
    assert p.reason.startswith("auto: float32") and "neither AMX-BF16 nor AVX512-BF16" in p.reason


@pytest.mark.parametrize(("amx", "avx512", "what"), [
    (True, False, "AMX-BF16"), (False, True, "AVX512-BF16"), (True, True, "AMX-BF16")])
def test_auto_with_bf16_hardware_is_bf16_autocast(monkeypatch, amx, avx512, what):
    _cpu_flags(monkeypatch, amx=amx, avx512=avx512)
    p = resolve_precision("auto", "cpu")
    assert (p.name, p.param_dtype, p.autocast_dtype) == ("bf16", torch.float32, torch.bfloat16)
    assert p.reason == f"auto: bfloat16 autocast, because this CPU has {what}"
    conv = torch.nn.Conv2d(3, 4, 3)
    with p.autocast():
        assert conv(torch.randn(1, 3, 5, 5)).dtype == torch.bfloat16
    assert conv.weight.dtype == torch.float32  # master weights untouched


def test_explicit_bf16_on_a_cpu_without_it_says_emulated(monkeypatch):
    _cpu_flags(monkeypatch, amx=False, avx512=False)
    p = resolve_precision("bf16", "cpu")
    assert (p.name, p.autocast_dtype) == ("bf16", torch.bfloat16)
    assert "emulated" in p.reason


def test_older_torch_probes(monkeypatch):
    """torch < 2.8 has no get_capabilities: the private probes answer, then oneDNN."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert P.cpu_bf16_support() == (True, "this CPU has AVX512-BF16")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert P.cpu_bf16_support() == (False, "oneDNN reports no bfloat16 support")
    assert resolve_precision("auto", "cpu").name == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_asks_for_native_bf16(monkeypatch, native):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Simulated GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    p = resolve_precision("auto", "cuda")
    assert asked == {"including_emulation": False}
    assert p.name == ("bf16" if native else "fp32") and "Simulated GPU" in p.reason


def test_bad_precisions():
    with pytest.raises(ValueError, match="got 'half'"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="got device 'mps'"):
        resolve_precision("bf16", "mps")
    assert resolve_precision("auto", "mps").name == "fp32"


def test_as_dict_is_json_ready():
    import json

    d = resolve_precision("fp32", "cpu").as_dict()
    assert json.loads(json.dumps(d)) == d and d["param_dtype"] == "float32"


# ---- what autocast does to BN --------------------------------------------------------------

@pytest.mark.parametrize("module", ["torch", "bnlab"])
def test_bn_statistics_are_float32_under_cpu_autocast(module):
    """Under autocast a convolution hands BN a bfloat16 tensor. BN must reduce it in float32
    (or wider): its running statistics then match float64 statistics of the same bfloat16
    values to float32 precision (~1e-7 relative), where bfloat16 accumulation would be off
    by ~2**-9 = 2e-3. The output stays bfloat16, as autocast leaves BN's input dtype."""
    from bnlab import nn as bnn

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4, 8, 8, generator=g) * 2 + 3).bfloat16()
    bn = torch.nn.BatchNorm2d(4, momentum=1.0) if module == "torch" else \
        bnn.BatchNorm2d(4, momentum=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x)
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    var = x64.var((0, 2, 3), unbiased=True)
    err_mean = ((bn.running_mean.double() - mean).abs() / mean.abs()).max().item()
    err_var = ((bn.running_var.double() - var).abs() / var).max().item()
    print(f"{module}: relative error of running mean {err_mean:.1e}, of running var {err_var:.1e}")
    assert bn.running_mean.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert err_mean < 1e-5 and err_var < 1e-5
    # y is the float32 normalization, rounded once to bfloat16 (within one bf16 ulp)
    ref = (x64 - mean.view(1, -1, 1, 1)) / torch.sqrt(
        x64.var((0, 2, 3), unbiased=False).view(1, -1, 1, 1) + bn.eps)
    assert ((y.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-6).all()
