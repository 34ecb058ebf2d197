"""``dynamicrafter convert IN OUT``: any DynamiCrafter-family checkpoint to a ``.safetensors`` file.

The output keeps the release key names (the 256 model's ``framestride_embed`` included), so the
original code's loaders and the community tools read it as well as this package does. Weights
are cast to one dtype (float16 by default; the noise-schedule buffers stay float32, as in the
released files), and ``--without-clip`` leaves out the two OpenCLIP towers (``cond_stage_model.*``,
``embedder.*``), which :func:`dynamicrafter.checkpoints.load_model` then takes from the OpenCLIP
weights: the layout of the community's "pruned" files.

The file is streamed tensor by tensor: the input is memory-mapped and each tensor is cast,
written and its pages released before the next, so the peak memory is about one tensor (the
safetensors library's writer needs every output tensor in memory at once). It is written under
a temporary name in the output's folder and renamed when complete.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import UserError
from .frontend import Parser, configure_logging, run_command

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "check_output", "convert", "main", "schedule_keys"]

logger = logging.getLogger(__name__)

#: The dtypes a converted checkpoint's weights can have (``torch.<name>``).
DTYPE_NAMES = ("float16", "bfloat16", "float32")


@functools.cache
def schedule_keys() -> frozenset[str]:
    """The schedule buffers the original stores at the top level of its checkpoints; kept in float32."""
    from .configs import DiffusionConfig
    from .diffusion.schedule import checkpoint_buffers

    return frozenset(checkpoint_buffers(DiffusionConfig(use_dynamic_rescale=True)))


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _target_dtype(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """``dtype`` for weights; float32 for the schedule buffers; anything else (integers) unchanged."""
    import torch

    if key in schedule_keys():
        return torch.float32
    return dtype if value.is_floating_point() else value.dtype


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` (a name of :data:`DTYPE_NAMES` or the torch dtype) as the torch dtype."""
    import torch

    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise UserError(f"Unsupported dtype {dtype}; choose one of: {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, name)


def check_output(target: str | Path, overwrite: bool = False) -> Path:
    """``target`` as a path if a conversion may write it: a ``.safetensors`` file, not a folder, new unless ``overwrite``.

    Imports nothing heavy, so the command refuses an existing output at once.
    """
    target = Path(target)
    if target.suffix != ".safetensors":
        raise UserError(f"The output {target} must be a .safetensors file.")
    if target.is_dir():
        raise UserError(f"The output {target} is a folder; give a file name ending in .safetensors.")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it.")
    return target


def convert(source: str | Path, target: str | Path, dtype: str | torch.dtype = "float16", without_clip: bool = False,
            overwrite: bool = False, merge: Sequence[str | Path] = ()) -> Path:
    """Write checkpoint ``source`` as the ``.safetensors`` file ``target``; returns ``target``.

    Args:
        source: any checkpoint :func:`dynamicrafter.checkpoints.load_model` reads (release
            ``.ckpt``, bare state dict, ``.safetensors``, with or without the CLIP towers), or a
            ControlNet or sketch encoder :func:`dynamicrafter.control.load_controlnet` reads.
        target: the ``.safetensors`` file to write; never left half-written.
        dtype: the floating-point weights' dtype, a torch dtype or its name (schedule buffers stay float32).
        without_clip: leave out ``cond_stage_model.*`` and ``embedder.*``.
        overwrite: replace ``target`` if it exists.
        merge: files whose tensors replace the source's tensors of the same (release) names, in
            order: a full fine-tune's ``unet.safetensors`` over its base checkpoint, say. A
            name the source lacks, or a tensor of another shape, is refused.
    Raises:
        ValueError: one sentence: unreadable or wrong input, existing or unwritable target, or a
            weight too large for float16.
    """
    import torch

    from .checkpoints import (
        CLIP_TOWERS,
        CheckpointMismatchError,
        read_release_state_dict,
        release_mapped_pages,
        write_safetensors,
        wrong_file_message,
    )
    from .files import write_atomically
    from .models.controlnet import is_controlnet

    source = Path(source)
    dtype = _torch_dtype(dtype)
    target = check_output(target, overwrite)
    started = time.perf_counter()
    state, mapped = read_release_state_dict(source)
    problem = wrong_file_message(state, source)
    if problem and not is_controlnet(state):  # a ControlNet or sketch encoder is converted as it is
        raise CheckpointMismatchError(problem)
    for path in merge:
        update, _ = read_release_state_dict(path)
        unknown = [k for k in update if k not in state]
        if unknown:
            raise UserError(f"{path} has {len(unknown)} tensor(s) the checkpoint {source} lacks, such as "
                             f"{unknown[0]}; is it for another model?")
        wrong = [k for k, v in update.items() if tuple(v.shape) != tuple(state[k].shape)]
        if wrong:
            raise UserError(f"{path} has {wrong[0]} of shape {tuple(update[wrong[0]].shape)} where the checkpoint "
                             f"{source} has {tuple(state[wrong[0]].shape)}; is it for another model?")
        state.update(update)
        logger.info("Taking %d tensors from %s.", len(update), path)
    if without_clip:
        state = {k: v for k, v in state.items() if not k.startswith(CLIP_TOWERS)}
    layout = [(k, _target_dtype(k, v, dtype), tuple(v.shape)) for k, v in state.items()]
    source_dtypes = {k: v.dtype for k, v in state.items()}

    def cast(key: str) -> torch.Tensor:
        value = state.pop(key)
        out = value.to(_target_dtype(key, value, dtype))
        if out.is_floating_point() and out.dtype != value.dtype and torch.isinf(out).any() and \
                not torch.isinf(value).any():
            raise UserError(f"{key} has values beyond the range of {str(dtype).replace('torch.', '')} "
                             f"(largest {value.abs().max().item():.3g}); convert with --dtype bfloat16 or float32.")
        if mapped and out.data_ptr() != value.data_ptr():
            release_mapped_pages(value)  # converted: the file's pages are no longer needed
        return out

    def written(key: str, value: torch.Tensor) -> None:
        if mapped and value.dtype == source_dtypes[key]:  # written straight from the file's pages
            release_mapped_pages(value)

    sizes = []
    try:
        write_atomically(target, lambda temporary: sizes.append(
            write_safetensors(temporary, layout, cast, {"format": "pt"}, written)))
    except OSError as exc:
        raise UserError(f"Cannot write {target} ({exc.strerror or exc}).") from None
    size = sizes[0]
    logger.info("Wrote %s: %d tensors, %s, %s%s, in %.1f s.", target, len(layout), _size(size),
                str(dtype).replace("torch.", ""), ", without the CLIP towers" if without_clip else "",
                time.perf_counter() - started)
    return target


def build_parser(prog: str = "dynamicrafter convert") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Convert a DynamiCrafter-family checkpoint to a .safetensors file "
                                            "with the release key names.")
    parser.add_argument("input", type=Path, help="checkpoint to read (.ckpt, .pt, .pth, .bin or .safetensors)")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float16",
                        help="dtype of the weights (default float16; schedule buffers stay float32)")
    parser.add_argument("--without-clip", "--without_clip", dest="without_clip", action="store_true",
                        help="leave out the OpenCLIP text and image towers (cond_stage_model.*, embedder.*)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--merge", action="append", type=Path, default=[], metavar="FILE",
                        help="take the tensors of FILE instead of the input's (e.g. a full fine-tune's "
                             "unet.safetensors over its base checkpoint); may be given several times")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dynamicrafter convert`` with ``argv`` (default: the command line); returns the exit status."""
    configure_logging()

    def body() -> None:
        args = build_parser().parse_args(argv)
        check_output(args.output, args.overwrite)  # before torch is imported: an existing output answers at once
        convert(args.input, args.output, args.dtype, args.without_clip, args.overwrite, args.merge)

    return run_command(body, interrupted="Interrupted; nothing was written.")


if __name__ == "__main__":
    sys.exit(main())
