"""Group norm followed by SiLU in one Triton kernel, for the UNet on CUDA.

``silu(group_norm(x + shift) * weight + bias)`` for ``x`` of shape ``[N, C, *spatial]`` read
through its strides, so the UNet's activations need no copy: contiguous ``[B*T, C, H, W]``,
channels-last ``[B*T, C, H, W]`` and the temporal convolutions' ``[B, C, T, H*W]`` views all
have spatial dimensions that merge into one stride and are handled as ``[N, C, S]``. A tensor
whose spatial dimensions do not merge (a sliced view, say) is copied once into the contiguous
layout first. ``shift`` (``[N, C]``, optional) is the ResBlock's timestep embedding, added
before the norm without being rounded to ``x``'s dtype.

The statistics, the normalisation and the SiLU are computed in float32 and the result is
rounded once to ``x``'s dtype (float32, bfloat16 or float16). The unfused PyTorch path rounds
twice in bfloat16 (after the norm and after the SiLU), so the two differ by about one bfloat16
rounding; in float32 they agree to ~1e-6.

The kernel has no backward: :func:`kernel_applies` says no when autograd would need one (a
training step), and the callers then use the unfused PyTorch layers.

Launch shape: one program per (sample, group) that reads its group twice (statistics, then
normalise + SiLU + store; the second read mostly hits the L2 cache). When there are too few
(sample, group) pairs to fill the GPU, as for the temporal convolutions' ``[B, C, T*H*W]`` view
(``B * 32`` groups of ``C/32 * T*H*W`` elements), each group's pixels are split into chunks
and two launches share the work: partial sums per chunk, then normalise per chunk.

``python -m dynamicrafter.models.fused_norm --bench`` times the kernel against the unfused
PyTorch ops at the 512 model's shapes (CUDA only).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
import torch.nn.functional as F

from ..errors import UserError

#: Input dtypes the kernel handles.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_HAS_TRITON = importlib.util.find_spec("triton") is not None

if _HAS_TRITON:
    import triton
    import triton.language as tl

    def _group_norm_silu_kernel(
        x_ptr, out_ptr, shift_ptr, weight_ptr, bias_ptr, partial_ptr,
        S, channels_per_group, num_groups, chunk, num_chunks,
        x_sn, x_sc, x_ss, o_sn, o_sc, o_ss, shift_sn, shift_sc,
        eps,
        PHASE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
    ):
        # One program per (sample n, group g, chunk k) of pixels [k * chunk, (k + 1) * chunk).
        # PHASE 0: the whole group (one chunk): statistics, then normalise + SiLU + store.
        # PHASE 1: partial sums of this chunk into partial_ptr[(n * G + g) * num_chunks + k, 0:2].
        # PHASE 2: combine the group's partial sums, then normalise + SiLU + store this chunk.
        # Sums are of (x + shift - pivot), pivot = the group's first element, so that the
        # variance E[d^2] - E[d]^2 does not cancel when the mean is large next to the spread.
        pid = tl.program_id(0)
        k = pid % num_chunks
        ng = pid // num_chunks
        n = ng // num_groups
        g = ng % num_groups
        c_idx = tl.arange(0, BLOCK_C)
        c_mask = c_idx < channels_per_group
        c = g * channels_per_group + c_idx
        s_begin = k * chunk
        s_end = tl.minimum(s_begin + chunk, S)
        x_base = x_ptr + n.to(tl.int64) * x_sn
        x_rows = x_base + c.to(tl.int64)[:, None] * x_sc
        o_rows = out_ptr + n.to(tl.int64) * o_sn + c.to(tl.int64)[:, None] * o_sc
        s_idx = tl.arange(0, BLOCK_S)

        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * shift_sn + c * shift_sc, mask=c_mask, other=0.0).to(tl.float32)
            pivot = tl.load(x_base + (g * channels_per_group).to(tl.int64) * x_sc).to(tl.float32)
            pivot += tl.load(shift_ptr + n * shift_sn + g * channels_per_group * shift_sc).to(tl.float32)
        else:
            sh = tl.zeros([BLOCK_C], dtype=tl.float32)
            pivot = tl.load(x_base + (g * channels_per_group).to(tl.int64) * x_sc).to(tl.float32)

        count = channels_per_group * S
        if PHASE == 2:
            part = partial_ptr + ng.to(tl.int64) * num_chunks * 2
            chunks = tl.arange(0, BLOCK_CHUNKS)
            total = tl.sum(tl.load(part + chunks * 2, mask=chunks < num_chunks, other=0.0), axis=0)
            total_sq = tl.sum(tl.load(part + chunks * 2 + 1, mask=chunks < num_chunks, other=0.0), axis=0)
        else:
            acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            acc_sq = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            for start in range(s_begin, s_end, BLOCK_S):
                s = start + s_idx
                mask = c_mask[:, None] & (s < s_end)[None, :]
                v = tl.load(x_rows + s.to(tl.int64)[None, :] * x_ss, mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, v + sh[:, None] - pivot, 0.0)
                acc += d
                acc_sq += d * d
            total = tl.sum(tl.sum(acc, axis=1), axis=0)
            total_sq = tl.sum(tl.sum(acc_sq, axis=1), axis=0)
            if PHASE == 1:
                part = partial_ptr + pid.to(tl.int64) * 2
                tl.store(part, total)
                tl.store(part + 1, total_sq)

        if PHASE != 1:
            mean_d = total / count
            var = tl.maximum(total_sq / count - mean_d * mean_d, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
            # y = (x + sh - mean) * rstd * w + b = x * scale + offset, per channel
            if HAS_WEIGHT:
                scale = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32) * rstd
            else:
                scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
            offset = (sh - (mean_d + pivot)) * scale
            if HAS_BIAS:
                offset += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            for start in range(s_begin, s_end, BLOCK_S):
                s = start + s_idx
                mask = c_mask[:, None] & (s < s_end)[None, :]
                v = tl.load(x_rows + s.to(tl.int64)[None, :] * x_ss, mask=mask, other=0.0).to(tl.float32)
                y = v * scale[:, None] + offset[:, None]
                y = y * tl.sigmoid(y)
                tl.store(o_rows + s.to(tl.int64)[None, :] * o_ss, y.to(out_ptr.dtype.element_ty), mask=mask)

    _jitted: dict[bool, object] = {}

    def _kernel() -> object:
        """The jitted kernel, or the interpreted one when ``TRITON_INTERPRET=1`` is set now.

        Triton decides between the two when a function is decorated, so the decoration waits
        for the first call in each mode. (Triton 3.8 also reads the variable when
        ``triton.language`` is first imported, so the tests start a child process with it set.)
        """
        interpret = bool(triton.knobs.runtime.interpret)
        if interpret not in _jitted:
            _jitted[interpret] = triton.jit(_group_norm_silu_kernel)
        return _jitted[interpret]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _HAS_TRITON and bool(triton.knobs.runtime.interpret)


def triton_available() -> bool:
    """Whether Triton can be imported (the kernel's only requirement besides a CUDA device)."""
    return _HAS_TRITON


def kernel_applies(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None) -> bool:
    """Whether :func:`group_norm_silu` would run the kernel for these inputs.

    Yes when Triton is importable, ``x`` (``[N, C, *spatial]``, at least 3-D) is a float32,
    bfloat16 or float16 CUDA tensor (or any device's under the interpreter), autograd will not
    need a backward (not ``torch.is_grad_enabled()`` with an input that requires grad), and
    ``torch.compile`` is not tracing (Inductor fuses the unfused ops itself).
    """
    if not _HAS_TRITON or x.ndim < 3 or x.dtype not in KERNEL_DTYPES or x.numel() == 0:
        return False
    if not (x.is_cuda or interpreting()):
        return False
    if torch.compiler.is_compiling():  # Inductor fuses the unfused ops itself
        return False
    tensors = [t for t in (x, weight, bias, shift) if t is not None]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def group_norm_silu_torch(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, eps: float = 1e-5,
                          shift: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in PyTorch ops: ``silu(group_norm(x + shift))`` in float32, rounded once.

    ``x``: ``[N, C, *spatial]``; ``weight``, ``bias``: ``[C]``; ``shift``: ``[N, C]``, added to
    every pixel of its (sample, channel) before the norm. Returns ``x``'s shape and dtype.
    Differentiable; used where the kernel does not apply.
    """
    h = x.float()
    if shift is not None:
        h = h + shift.float().reshape(*shift.shape, *([1] * (x.ndim - 2)))
    h = F.group_norm(h, num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return F.silu(h).to(x.dtype)


def _as_ncs(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial] -> [N, C, S]`` as a view when the spatial dimensions merge into one stride."""
    try:
        return x.view(x.shape[0], x.shape[1], -1)
    except RuntimeError:
        return x.contiguous().view(x.shape[0], x.shape[1], -1)


def _launch_plan(programs: int, length: int, block_s: int, device: torch.device) -> int:
    """Chunks per group: 1 when ``programs`` (sample, group) pairs fill the GPU, else enough to.

    The target is four programs per multiprocessor (132 multiprocessors assumed off CUDA).
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    target = 4 * sms
    if programs * 2 >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(length, block_s), 256))


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, shift: torch.Tensor | None = None,
                    *, chunks: int | None = None) -> torch.Tensor:
    """``silu(group_norm(x + shift) * weight + bias)``, in one kernel where :func:`kernel_applies`.

    ``x``: ``[N, C, *spatial]``, any strides (merged to ``[N, C, S]`` without a copy when the
    spatial dimensions allow, else copied once); ``weight``, ``bias``: ``[C]`` (any float dtype);
    ``shift``: ``[N, C]``, optional. Returns a new tensor of ``x``'s shape, dtype and memory
    layout (``torch.empty_like``). ``chunks`` forces the number of pixel chunks per group (tests;
    ``None`` picks by the GPU's size). Elsewhere this is :func:`group_norm_silu_torch`.
    """
    if not kernel_applies(x, weight, bias, shift):
        return group_norm_silu_torch(x, num_groups, weight, bias, eps, shift)
    n, c = x.shape[:2]
    if c % num_groups:
        raise UserError(f"group_norm_silu: {c} channels do not split into {num_groups} groups")
    xv = _as_ncs(x)
    out = torch.empty_like(x if xv.data_ptr() == x.data_ptr() else xv.view(x.shape))
    ov = _as_ncs(out)
    length = xv.shape[2]
    per_group = c // num_groups
    block_c = triton.next_power_of_2(per_group)
    block_s = max(16, min(triton.next_power_of_2(length), 2048 // block_c))
    programs = n * num_groups
    chunks = chunks or _launch_plan(programs, length, block_s, x.device)
    chunks = max(1, min(chunks, length))
    # chunk: pixels per program, a multiple of the block, so that every chunk but the last is full
    chunk = triton.cdiv(triton.cdiv(length, chunks), block_s) * block_s
    chunks = triton.cdiv(length, chunk)
    if shift is not None:
        if shift.shape != (n, c):
            raise UserError(f"group_norm_silu: shift must be [N, C] = {[n, c]}, got {list(shift.shape)}")
        shift_strides = shift.stride()
    else:
        shift_strides = (0, 0)
    partial = torch.empty((programs * chunks, 2) if chunks > 1 else (1,), device=x.device, dtype=torch.float32)
    dummy = xv  # stands for absent weight/bias/shift (never read)
    kernel = _kernel()
    common = dict(BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_CHUNKS=triton.next_power_of_2(chunks),
                  HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                  num_warps=4)
    args = (xv, ov, dummy if shift is None else shift, dummy if weight is None else weight,
            dummy if bias is None else bias, partial, length, per_group, num_groups, chunk, chunks,
            *xv.stride(), *ov.stride(), *shift_strides, float(eps))
    grid = (programs * chunks,)
    if chunks == 1:
        kernel[grid](*args, PHASE=0, **common)
    else:
        kernel[grid](*args, PHASE=1, **common)
        kernel[grid](*args, PHASE=2, **common)
    return out


def _bench() -> int:
    """Time the kernel against the unfused ops at the 512 model's shapes; prints one line each."""
    if not (_HAS_TRITON and torch.cuda.is_available()):
        print("fused_norm --bench needs a CUDA GPU and Triton; none here.", file=sys.stderr)
        return 1
    from torch.utils.benchmark import Timer

    device = torch.device("cuda")
    dtype = torch.bfloat16
    batch, frames, height, width = 2, 16, 40, 64  # 512 model: guided batch 2, 16 frames, 320x512 / 8
    print("shape (layout)                              unfused ms  fused ms  speedup")
    for channels, down in ((320, 1), (640, 2), (1280, 4), (1280, 8)):
        h, w = height // down, width // down
        x = torch.randn(batch * frames, channels, h, w, device=device, dtype=dtype)
        weight = torch.randn(channels, device=device, dtype=dtype)
        bias = torch.randn(channels, device=device, dtype=dtype)
        shift = torch.randn(batch * frames, channels, device=device, dtype=dtype)
        temporal = x.view(batch, frames, channels, h * w).transpose(1, 2).contiguous()
        cases = [(f"[{batch * frames}, {channels}, {h}, {w}] + shift", x, shift),
                 (f"[{batch * frames}, {channels}, {h}, {w}] channels-last",
                  x.contiguous(memory_format=torch.channels_last), None),
                 (f"[{batch}, {channels}, {frames}, {h * w}] temporal", temporal, None)]
        for name, inp, sh in cases:
            def unfused(inp=inp, sh=sh):
                y = inp if sh is None else inp + sh[:, :, None, None]
                return F.silu(F.group_norm(y, 32, weight, bias, 1e-5))

            def fused(inp=inp, sh=sh):
                return group_norm_silu(inp, 32, weight, bias, 1e-5, sh)

            times = [Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.5).median * 1e3
                     for f in (unfused, fused)]
            print(f"{name:<44}{times[0]:>10.3f}{times[1]:>10.3f}{times[0] / times[1]:>8.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamicrafter.models.fused_norm", description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time fused against unfused on CUDA (512 model shapes)")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    return _bench()


if __name__ == "__main__":
    sys.exit(main())
