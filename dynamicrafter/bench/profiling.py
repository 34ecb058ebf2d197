"""Where a UNet call spends its time: ``torch.profiler`` over one guided call, by kind of operation.

Used by ``python -m dynamicrafter.bench ... --profile``: the per-kind table (convolutions, matrix
products, attention, norms, activations, other element-wise work, copies) says which change to
the UNet can still pay off, e.g. whether a step at 25 % of the matmul rate loses its time in the
convolutions or in the memory-bound work around them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["CATEGORIES", "category", "profile_call"]

#: Kinds of operation, in the order they are tried; the first whose pattern matches an op name wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"attention|attn|flash|fmha|sdpa|softmax"),
    ("convolution", r"conv(?!ert)|cudnn|mkldnn|onednn|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"addmm|::mm\b|bmm|matmul|linear|gemm|cublas|cutlass|xmma"),
    ("norm", r"norm|moments|welford"),
    ("activation", r"silu|gelu|sigmoid|swish"),
    ("copy", r"copy|contiguous|clone|::cat\b|cat_|transpose|permute|nchw|nhwc|memcpy|memset|fill"),
    ("elementwise", r"add|mul|div|sub|exp|cos|sin|elementwise|reduce|where|pow|sqrt|neg"),
)
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES)


def category(op: str) -> str:
    """The kind of an operator or kernel name, e.g. ``aten::cudnn_convolution`` -> ``convolution``."""
    for name, pattern in _COMPILED:
        if pattern.search(op):
            return name
    return "other"


def profile_call(fn: Callable[[], object], device: torch.device, top: int = 12) -> dict:
    """Profile one call of ``fn`` (already warmed up) and sum its time by :func:`category`.

    On CUDA the GPU kernels' time is counted (each kernel by its own name; where the profiler
    recorded no kernel, each operator's own device time); elsewhere each operator's self CPU time
    (so nested operators are not counted twice). Returns
    ``{"total_ms", "by_category": {kind: {"ms", "share", "calls"}}, "top": [{"name", "ms", "calls"}]}``,
    categories sorted by time.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    if cuda:  # kernels: the events that ran on the device
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                times[event.name] += event.time_range.elapsed_us() / 1e3
                calls[event.name] += 1
    if not times:  # the CPU, or no kernel events (then each operator's own device or CPU time)
        for event in prof.key_averages():
            own = getattr(event, "self_device_time_total", 0) if cuda else 0
            own = own or event.self_cpu_time_total
            if own > 0:
                times[event.key] += own / 1e3
                calls[event.key] += event.count
    total = sum(times.values()) or 1e-12
    kinds: dict[str, dict] = {}
    for name, ms in times.items():
        entry = kinds.setdefault(category(name), {"ms": 0.0, "share": 0.0, "calls": 0})
        entry["ms"] += ms
        entry["calls"] += calls[name]
    for entry in kinds.values():
        entry["share"] = entry["ms"] / total
    ranked = sorted(times, key=times.get, reverse=True)[:top]
    return {
        "total_ms": total,
        "by_category": dict(sorted(kinds.items(), key=lambda item: -item[1]["ms"])),
        "top": [{"name": name[:120], "ms": times[name], "calls": calls[name]} for name in ranked],
    }
