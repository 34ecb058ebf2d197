"""Choosing the device and the precision to run on."""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import GenerationError, UserError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def mps_available() -> bool:
    """Whether Apple's Metal (MPS) backend is usable here."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_device() -> torch.device:
    """``cuda:0`` when a GPU is usable, else Apple's ``mps``, else the CPU (with a warning: it is slow)."""
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    if mps_available():
        logger.info("Using Apple's Metal backend (mps).")
        return torch.device("mps")
    logger.warning("CUDA is not available; running on the CPU, which is slow.")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable ``torch.device`` from a user's choice (None or ``auto`` = :func:`default_device`).

    A CUDA device always carries its number: ``"cuda"`` becomes the current GPU, ``cuda:0`` unless
    changed.
    """
    if device is None or str(device) == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{device!r} is not a torch device; use for example cuda:0, mps or cpu.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"Device {device} needs CUDA, which is not available here; use cpu.")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise UserError(f"Device {device} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s).")
        if dev.index is None:  # "cuda" is the current GPU; torch.cuda.set_device and others need its number
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps" and not mps_available():
        raise UserError(f"Device {device} needs Apple's Metal backend, which is not available here; use cpu.")
    elif dev.type not in ("cpu", "mps", "cuda"):
        raise UserError(f"Device type {dev.type!r} is not supported; use cuda, mps or cpu.")
    return dev


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: the user's, else bf16 where the hardware does it fast, else fp16 on CUDA, else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UserError(f"Unsupported dtype {dtype}; use float32, float16 or bfloat16.")
        return dtype
    if dtype is not None and str(dtype) != "auto":
        if str(dtype).lower() not in DTYPES:
            raise UserError(f"Unknown dtype {dtype!r}; use float32, float16, bfloat16 or auto.")
        return DTYPES[str(dtype).lower()]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.bfloat16 if mps_has_bf16() else torch.float16
    if device.type == "cpu" and cpu_has_bf16_units():
        return torch.bfloat16
    return torch.float32


@functools.cache
def mps_has_bf16() -> bool:
    """Whether the MPS backend can hold bfloat16 tensors (macOS 14 and newer)."""
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def vae_dtype_for(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The VAE never runs in float16 (it overflows into NaN, the original's black videos), nor in half on MPS."""
    if dtype == torch.float16 or (device is not None and device.type == "mps"):
        return torch.float32
    return dtype


def allow_tf32(device: torch.device, dtype: torch.dtype) -> None:
    """Let float32 matmuls and convolutions on a GPU use TF32 tensor cores (as the original's runs do)."""
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextmanager
def in_float32(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in float32 inside the block, then give it back its dtype."""
    dtype = next(module.parameters()).dtype
    module.float()
    try:
        yield
    finally:
        module.to(dtype)


def finite_or_redo_in_float32(run: Callable[[], torch.Tensor], module: torch.nn.Module, what: str,
                              advice: str = "check the checkpoint", no_redo: str | None = None) -> torch.Tensor:
    """``run()``'s result, run again with ``module`` in float32 if it came out NaN or infinite in half precision.

    Half precision can overflow where float32 does not (the original's black videos in float16),
    so a non-finite result of a half-precision ``module`` is redone once in float32 from the same
    inputs (``run`` must replay its own random draws) and the module gets its dtype back. A
    result still non-finite, or any non-finite result when ``no_redo`` says why a redo cannot help
    (a float8 UNet), raises :class:`~dynamicrafter.errors.GenerationError`: ``what`` (e.g. "The
    VAE") produced NaN or infinite values, and ``advice``.
    """
    out = run()
    if torch.isfinite(out).all():
        return out
    if no_redo is not None:
        raise GenerationError(no_redo)
    dtype = next(module.parameters()).dtype
    if dtype != torch.float32:
        logger.warning("%s gave non-finite values in %s; running it again in float32 from the same inputs.",
                       what, str(dtype).replace("torch.", ""))
        with in_float32(module):
            out = run()
    if not torch.isfinite(out).all():
        raise GenerationError(f"{what} produced NaN or infinite values even in float32; {advice}.")
    return out


#: ``torch.compile`` modes the pipeline accepts. ``regional`` (what ``compile=True`` means) compiles the
#: UNet's repeated blocks (:func:`compile_repeated_blocks`); the others compile the whole UNet as one
#: graph in that Inductor mode (``reduce-overhead`` adds CUDA graphs).
COMPILE_MODES = ("regional", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str | None) -> str | None:
    """The UNet's ``torch.compile`` mode (one of :data:`COMPILE_MODES`), or ``None`` to run it eagerly.

    ``compile`` is ``True`` (``"regional"``), ``False``/``None``, or a mode of :data:`COMPILE_MODES`.
    It is off unless asked for: compiling the whole UNet had not finished after four minutes at 512
    on an H100, where a whole video without it takes 7.3 s, and regional compilation, which
    compiles a few dozen block graphs instead, has not been timed on a GPU yet (docs/benchmarks.md).
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return "regional"
    if compile not in COMPILE_MODES:
        raise UserError(f"Unknown compile mode {compile!r}; use True, False or one of: {', '.join(COMPILE_MODES)}.")
    return compile


def compile_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels between processes (``TORCHINDUCTOR_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dynamicrafter" / "inductor")


#: How many graphs regional compilation lets Dynamo keep per block of a class (video sizes, dtypes,
#: weight formats) before it would run the class's new variants eagerly; Dynamo's own limit is 8
#: per compiled function, fewer than the distinct ResBlocks of one size (14 in the full-size UNets).
VARIANTS_PER_BLOCK = 8


def compile_repeated_blocks(module: torch.nn.Module, backend: str | Callable = "inductor") -> list[torch.nn.Module]:
    """Compile ``module``'s repeated blocks in place ("regional" compilation); returns the blocks compiled.

    ``module.repeated_blocks`` names the block classes (the UNet's: ``ResBlock``,
    ``SpatialTransformer``, ``TemporalTransformer``). Each class's ``forward`` is compiled once,
    with static shapes, and every block of the class runs through that one compiled function:
    Dynamo makes a graph per distinct block (input shapes, weight shapes and dtypes, arguments
    such as the frame count) and every block and call that matches one reuses it. The graphs are
    therefore the distinct block shapes, not the blocks (23 for the 55 blocks of a full-size UNet), and
    each is small; the code between the blocks (embeddings, skips, up- and downsampling) runs
    eagerly. A block's ``forward`` becomes an instance attribute calling the compiled function;
    the module, its parameters and key names are unchanged; :func:`restore_blocks` undoes it.
    """
    kinds = tuple(getattr(module, "repeated_blocks", ()))
    if not kinds:
        raise TypeError(f"{type(module).__name__} names no repeated_blocks to compile.")
    compiled = {kind: torch.compile(kind.forward, dynamic=False, backend=backend) for kind in kinds}
    blocks = [block for block in module.modules() if type(block) in compiled]
    for block in blocks:
        block.forward = types.MethodType(compiled[type(block)], block)
    return blocks


def restore_blocks(blocks: list[torch.nn.Module]) -> None:
    """Undo :func:`compile_repeated_blocks`: each block runs its class's own ``forward`` again."""
    for block in blocks:
        block.__dict__.pop("forward", None)


class CompiledModule:
    """A module run through ``torch.compile`` with static shapes, saying when a new size compiles.

    ``mode`` ``"regional"`` compiles the module's repeated blocks (:func:`compile_repeated_blocks`),
    any other mode of :data:`COMPILE_MODES` the whole module as one graph. Either way graphs are
    made once per video size (``dynamic=False``) and reused by every later call and step of that
    size; Inductor's kernels are cached on disk (:func:`compile_cache_dir`) for the next process.
    ``backend`` is ``torch.compile``'s (tests count graphs with their own).
    """

    def __init__(self, module: torch.nn.Module, mode: str, backend: str | Callable = "inductor") -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))  # read at the first compilation
        self.module = module
        self.mode = mode
        #: The blocks compiled one by one (mode "regional"), else none.
        self.blocks: list[torch.nn.Module] = []
        self.compiled: Callable = module
        if mode == "regional":
            self.blocks = compile_repeated_blocks(module, backend)
        else:
            self.compiled = torch.compile(module, mode=None if mode == "default" else mode, dynamic=False,
                                          backend=backend)
        per_class = collections.Counter(type(block) for block in self.blocks)
        self._recompile_limit = VARIANTS_PER_BLOCK * max(per_class.values(), default=1)
        self._sizes: set[tuple] = set()

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        size = (tuple(x.shape), x.device.type)
        if size not in self._sizes:
            self._sizes.add(size)
            what = "the UNet's repeated blocks" if self.blocks else "the UNet"
            logger.info("Compiling %s for input %s (mode %s): once per size; kernels are cached in %s.",
                        what, "x".join(map(str, x.shape)), self.mode, os.environ["TORCHINDUCTOR_CACHE_DIR"])
        if not self.blocks:
            return self.compiled(x, *args, **kwargs)
        dynamo = torch._dynamo.config
        with dynamo.patch(recompile_limit=max(dynamo.recompile_limit, self._recompile_limit),
                          accumulated_recompile_limit=max(dynamo.accumulated_recompile_limit, self._recompile_limit)):
            return self.compiled(x, *args, **kwargs)

    def restore(self) -> None:
        """Give the module back its eager blocks (regional mode; the whole-module wrapper leaves it untouched)."""
        restore_blocks(self.blocks)
        self.blocks = []


def usable_cpus() -> int:
    """The CPUs this process may run on: its CPU affinity, within a container's CPU quota (cgroup v2 or v1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    quota = None
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
            if fields[0] not in ("max", "-1"):
                quota = int(fields[0]) / int(fields[1])
            break
        except (OSError, ValueError, IndexError):
            continue
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return count


def busy_cpus(interval: float = 0.25) -> float:
    """How many of the machine's CPUs other work keeps busy now, measured over ``interval`` seconds.

    From ``/proc/stat`` (time stolen by the hypervisor counts as busy: a shared virtual machine's
    neighbours); where there is none, the 1-minute load average. This process sleeps meanwhile, so
    its own earlier work (the last video's threads, which a load average still counts for a
    minute) does not count.
    """
    def times() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle + waiting for I/O

    try:
        total, idle = times()
        time.sleep(interval)
        total_after, idle_after = times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    elapsed = total_after - total
    return 0.0 if elapsed <= 0 else (1 - (idle_after - idle) / elapsed) * (os.cpu_count() or 1)


def choose_cpu_threads(requested: int | None = None) -> tuple[int, str]:
    """How many threads the CPU arithmetic should use, and why, in words for the log.

    ``requested`` (``--threads``) is used as given. Otherwise: the CPUs this process may use
    (:func:`usable_cpus`) less those other work keeps busy (:func:`busy_cpus`), at least one, and
    never more than PyTorch's own choice. Each thread of an OpenMP region waits for the others
    at its end, so a thread whose CPU is taken stalls all of them: on a shared 2-CPU machine a
    tiny model's video took 30 to 34 s with PyTorch's default of 2 threads against 0.9 to 1.2 s
    with one (docs/benchmarks.md, "CPU threads").
    """
    if requested is not None:
        return requested, "as --threads asks"
    usable = usable_cpus()
    ceiling = min(torch.get_num_threads(), usable)
    if ceiling <= 1:  # nothing to choose: no need to measure
        return 1, "the one usable CPU" if usable <= 1 else "PyTorch's own limit: OMP_NUM_THREADS or torch.set_num_threads"
    busy = busy_cpus()
    free = (os.cpu_count() or usable) - busy  # the machine's CPUs, which a container's quota may not all give
    threads = max(1, min(ceiling, math.floor(free + 0.5)))
    if threads < ceiling:
        why = f"of {usable} usable CPUs; other work keeps {busy:.1f} busy"
    else:
        why = f"{usable} usable CPUs, {busy:.1f} busy with other work"
    return threads, why


def use_cpu_threads(requested: int | None, device: torch.device | str | None) -> int | None:
    """Set PyTorch's CPU threads for a model on ``device`` and say so in the log; returns the count set.

    Without ``requested`` the count is chosen (:func:`choose_cpu_threads`) only when the model runs
    on the CPU; on a GPU PyTorch's default stays (returns ``None``).
    """
    if requested is None and torch.device(device or "cpu").type != "cpu":
        return None
    threads, why = choose_cpu_threads(requested)
    torch.set_num_threads(threads)
    logger.info("Using %d CPU thread%s (%s); --threads N changes it.", threads, "" if threads == 1 else "s", why)
    return threads
