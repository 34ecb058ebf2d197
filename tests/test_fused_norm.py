"""The fused group norm + SiLU kernel and the UNet's switch for it.

The ``test_kernel_*`` tests launch the kernel: on CUDA when there is a GPU, else on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, which runs each program in Python, so the
tensors are small). Triton reads that variable when it is imported, so without a GPU
:func:`test_interpreted_kernel_cases` runs those tests again in a child pytest with it set.
:func:`test_compiles_for_a_hopper_gpu_without_one` runs Triton's real compiler (to a cubin), which
the interpreter skips. The UNet's CPU path must stay the unfused modules, bit for bit.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dynamicrafter.models import fused_norm, unet
from dynamicrafter.models.attention import frames_to_time_major

from .conftest import MODULE_TOL, load_tiny, relative_error

needs_triton = pytest.mark.skipif(not fused_norm.triton_available(), reason="Triton is not installed")


@pytest.fixture
def device():
    """Where the kernel runs: CUDA, or the CPU under the interpreter; else the test is skipped."""
    if not fused_norm.triton_available():
        pytest.skip("Triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if fused_norm.interpreting():
        return torch.device("cpu")
    pytest.skip("no GPU: run by test_interpreted_kernel_cases under TRITON_INTERPRET=1")


def _inputs(n=2, c=64, h=5, w=7, dtype=torch.float32, seed=0, device="cpu"):
    """``x`` ``[n, c, h, w]`` with a mean away from 0 (tests the variance's pivot), weight, bias, shift."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + 3).to(device, dtype)
    weight = torch.randn(c, generator=gen).to(device, dtype)
    bias = torch.randn(c, generator=gen).to(device, dtype)
    shift = torch.randn(n, c, generator=gen).to(device, dtype)
    return x, weight, bias, shift


def _float_reference(x, weight, bias, shift, groups=32, eps=1e-5):
    """``silu(group_norm(x + shift))`` in float64, as float32."""
    h = x.double() + (0 if shift is None else shift.double()[:, :, None, None])
    h = F.group_norm(h, groups, weight.double(), bias.double(), eps)
    return F.silu(h).float()


LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kernel_float32_matches_group_norm_silu(device, layout, with_shift, chunks):
    # C=64: 2 channels a group; 5x7 = 35 pixels, not a multiple of the block (16)
    x, weight, bias, shift = _inputs(device=device)
    x = LAYOUTS[layout](x)
    shift = shift if with_shift else None
    out = fused_norm.group_norm_silu(x, 32, weight, bias, 1e-5, shift, chunks=chunks)
    assert out.dtype == x.dtype and out.stride() == x.stride()
    torch.testing.assert_close(out, _float_reference(x, weight, bias, shift), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [1, 2])
def test_kernel_on_the_temporal_view_without_a_copy(device, chunks):
    """The temporal convolutions' ``[B, C, T, H*W]`` view of channels-last frames (strides ``[T*HW*C, 1, HW*C, C]``)."""
    b, t, c, h, w = 2, 3, 96, 3, 5  # 3 channels a group (not a power of two)
    x, weight, bias, _ = _inputs(b * t, c, h, w, device=device)
    frames = x.contiguous(memory_format=torch.channels_last)
    view = frames_to_time_major(frames, t)
    assert view.data_ptr() == frames.data_ptr() and not view.is_contiguous()
    out = fused_norm.group_norm_silu(view, 32, weight, bias, chunks=chunks)
    assert out.stride() == view.stride()
    expected = F.silu(F.group_norm(view.double(), 32, weight.double(), bias.double(), 1e-5)).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_kernel_copies_strides_it_cannot_merge(device):
    x, weight, bias, shift = _inputs(w=14, device=device)
    sliced = x[..., ::2]  # H and W do not merge into one stride
    out = fused_norm.group_norm_silu(sliced, 32, weight, bias, 1e-5, shift)
    torch.testing.assert_close(out, _float_reference(sliced, weight, bias, shift), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kernel_half_precision_rounds_once(device, dtype, layout):
    """bfloat16/float16 in: float32 inside, one rounding: the exact result rounded, but for rare ties."""
    x, weight, bias, shift = _inputs(dtype=dtype, device=device)
    x = LAYOUTS[layout](x)
    out = fused_norm.group_norm_silu(x, 32, weight, bias, 1e-5, shift)
    assert out.dtype == dtype
    exact = _float_reference(x, weight, bias, shift)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # Triton 3.8's interpreter truncates float32 -> bfloat16 (its cast ignores the rounding
        # mode); on a GPU the same cast rounds to nearest even, like PyTorch's.
        rounded = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    else:
        rounded = exact.to(dtype)
    ulp = torch.finfo(dtype).eps  # one unit in the last place, relative
    torch.testing.assert_close(out.float(), rounded.float(), rtol=ulp, atol=1e-6)
    assert (out == rounded).float().mean() > 0.99


@needs_triton
def test_applies_only_without_autograd_and_on_a_supported_device(monkeypatch):
    x, weight, bias, shift = _inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_norm.kernel_applies(x, weight, bias, shift)  # CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_norm.kernel_applies(x, weight, bias, shift)
    assert not fused_norm.kernel_applies(x.double(), weight, bias, shift)
    weight.requires_grad_(True)
    assert not fused_norm.kernel_applies(x, weight, bias, shift)  # a training step: no backward here
    with torch.no_grad():
        assert fused_norm.kernel_applies(x, weight, bias, shift)
    # where it does not apply, the PyTorch ops run, with gradients
    out = fused_norm.group_norm_silu(x, 32, weight, bias, 1e-5, shift)
    out.sum().backward()
    assert weight.grad is not None


def test_use_fused_norm_picks_by_device_and_switch(monkeypatch):
    from dynamicrafter.models import unet as unet_module

    model = copy.deepcopy(load_tiny("tiny256").model.unet)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model.fused_norm is None
    assert not model.use_fused_norm(cpu)
    monkeypatch.setattr(fused_norm, "triton_available", lambda: True)
    assert not model.use_fused_norm(cuda)  # off by default until timed on a GPU
    monkeypatch.setattr(unet_module, "FUSED_NORM_BY_DEFAULT", True)
    assert model.use_fused_norm(cuda) and not model.use_fused_norm(cpu)
    monkeypatch.setattr(fused_norm, "triton_available", lambda: False)
    assert not model.use_fused_norm(cuda)
    model.fused_norm = False
    assert not model.use_fused_norm(cuda)
    model.fused_norm = True
    assert model.use_fused_norm(cpu)


def _unet_out(model):
    v = load_tiny("tiny256").vectors
    with torch.no_grad():
        return model(v["unet.x"], v["unet.t"], v["unet.context"], v["unet.fs"])


def test_unet_cpu_forward_is_the_unfused_modules(monkeypatch):
    """On the CPU, ``fused_norm=True`` falls back to the modules: the same bits as ``False`` and the reference's values."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(fused_norm, "group_norm_silu", lambda *a, **k: calls.append(a))
    model = copy.deepcopy(load_tiny("tiny256").model.unet)
    expected = _unet_out(model)
    model.fused_norm = True
    assert torch.equal(_unet_out(model), expected) and not calls
    assert relative_error(expected, load_tiny("tiny256").vectors["unet.out"]) < MODULE_TOL


def test_unet_routes_every_norm_silu_through_the_fused_op(monkeypatch):
    """With the kernel made to apply, each GroupNorm + SiLU pair goes through ``group_norm_silu``."""
    model = copy.deepcopy(load_tiny("tiny256").model.unet)
    model.fused_norm = True
    seen = []

    def fake(x, num_groups, weight, bias, eps, shift=None):
        seen.append((weight.data_ptr(), shift is not None))
        return fused_norm.group_norm_silu_torch(x, num_groups, weight, bias, eps, shift)

    monkeypatch.setattr(fused_norm, "kernel_applies", lambda *a: True)
    monkeypatch.setattr(fused_norm, "group_norm_silu", fake)
    out = _unet_out(model)
    resblocks = [m for m in model.modules() if isinstance(m, unet.ResBlock)]
    temporal = [m for m in model.modules() if isinstance(m, unet.TemporalConvBlock)]
    norms = [model.out[0], *(r.in_layers[0] for r in resblocks), *(r.out_layers[0] for r in resblocks),
             *(stage[0] for m in temporal for stage in (m.conv1, m.conv2, m.conv3, m.conv4))]
    assert temporal and len(seen) == len(norms)
    assert {ptr for ptr, _ in seen} == {m.weight.data_ptr() for m in norms}
    assert sum(with_shift for _, with_shift in seen) == len(resblocks)  # the out_layers' norm gets the embedding
    assert relative_error(out, load_tiny("tiny256").vectors["unet.out"]) < MODULE_TOL


def test_kernel_in_a_resblock_matches_the_modules(device):
    """A ResBlock with its temporal convolutions (channels-last: strided views), kernel against modules, float32."""
    torch.manual_seed(0)
    block = unet.ResBlock(32, 16, 64).eval().to(device)
    x = torch.randn(1 * 2, 32, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(1 * 2, 16, device=device)
    with torch.no_grad():
        expected = block(x, emb, 2)
        out = block(x, emb, 2, fused_norm=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize(("dtype", "with_params"), [("bf16", True), ("fp32", False)])
def test_compiles_for_a_hopper_gpu_without_one(monkeypatch, tmp_path, dtype, with_params):
    """Triton's real compiler (not the interpreter) turns each phase into a cubin for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if fused_norm.interpreting():
        pytest.skip("the interpreter replaces the compiler in this process")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pointers = {name: f"*{dtype}" for name in ("x_ptr", "out_ptr", "shift_ptr", "weight_ptr", "bias_ptr")}
    ints = ("S", "channels_per_group", "num_groups", "chunk", "num_chunks",
            "x_sn", "x_sc", "x_ss", "o_sn", "o_sc", "o_ss", "shift_sn", "shift_sc")
    signature = {**pointers, "partial_ptr": "*fp32", **{name: "i32" for name in ints}, "eps": "fp32"}
    for phase in (0, 1, 2):
        constants = dict(PHASE=phase, HAS_SHIFT=with_params, HAS_WEIGHT=with_params, HAS_BIAS=with_params,
                         BLOCK_C=16, BLOCK_S=128, BLOCK_CHUNKS=4)
        source = ASTSource(fn=fused_norm._kernel(), signature={**signature, **dict.fromkeys(constants, "constexpr")},
                           constexprs=constants)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        except RuntimeError as exc:
            if "ptxas" in str(exc):
                pytest.skip(f"no usable ptxas: {exc}")
            raise
        assert compiled.asm["cubin"]


@needs_triton
def test_interpreted_kernel_cases():
    """Without a GPU: the ``test_kernel_*`` tests in a child pytest with ``TRITON_INTERPRET=1``."""
    if torch.cuda.is_available() or fused_norm.interpreting():
        pytest.skip("the kernel tests run in this process")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).relative_to(root)), "-q",
                             "-p", "no:cacheprovider", "-k", "test_kernel_"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "skipped" not in result.stdout and " passed" in result.stdout, result.stdout[-2000:]
