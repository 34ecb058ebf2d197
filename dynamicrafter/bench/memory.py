"""How much accelerator memory a training step needs, estimated without one.

:func:`estimate_step_memory` builds the model on the meta device (shapes and dtypes, no
values), makes it trainable exactly as :func:`~dynamicrafter.training.model.prepare_model`
does (LoRA or full, gradient checkpointing) and runs two optimizer steps on a synthetic encoded
batch while counting the bytes of every live tensor storage. The peak, plus the weights, is
what ``torch.cuda.max_memory_allocated`` would report, with these differences:

- attention is counted as a fused kernel (FlashAttention's saved tensors: inputs, output and
  one float32 log-sum-exp per query), not as the math path's attention matrices;
- there is no autocast on the meta device: trained float32 weights compute in float32, where a
  bf16 run computes in bf16 and keeps a bf16 copy of each of those weights during the step
  (for full fine-tuning of the 512 UNet, 2.9 GB more weight copies and smaller activations);
- the frozen encoders' own pass (VAE and CLIP on the clip, before the UNet) and the CUDA
  allocator's fragmentation and workspaces are not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..configs import ModelConfig
from ..models.dynamicrafter import DynamiCrafter
from ..training.config import TrainConfig
from ..training.objective import EncodedBatch, NullConditioning


@dataclass
class MemoryEstimate:
    """Bytes of one training step: ``weights`` (every parameter and buffer, after preparation)
    and ``peak`` (weights plus the most that was alive at once during the steps)."""

    weights: int
    peak: int
    trained_values: int


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that operators create, while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self._bound = 0  # at least the live bytes: the last exact count plus what was made since

    def _current(self) -> int:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(size for _, size in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live or self.live[key][0].expired():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self._bound += storage.nbytes()
        if self._bound > self.peak:  # only then can the live bytes be a new peak: count them exactly
            self._bound = self._current()
            self.peak = max(self.peak, self._bound)
        return out


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel: the output's shape, FlashAttention's saved tensors."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        log_sum_exp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def estimate_step_memory(config: ModelConfig, cfg: TrainConfig, steps: int = 2) -> MemoryEstimate:
    """Peak bytes of a training step of ``config``'s model as ``cfg`` sets it up (see the module's notes).

    Frozen weights are bfloat16 with ``cfg.precision == "bf16"`` (float32 otherwise); trained
    ones float32, as the trainer keeps them. Two optimizer steps, so the optimizer's state counts.
    """
    from ..training.model import make_optimizer, prepare_model

    meta = torch.device("meta")
    frozen = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(frozen)
    try:
        with meta:
            model = DynamiCrafter(config)
    finally:
        torch.set_default_dtype(default)
    module, params, _ = prepare_model(model, cfg)
    optimizer = make_optimizer(params, cfg)
    b, t = cfg.batch_size, cfg.frames
    h, w = (cfg.height or config.height) // 8, (cfg.width or config.width) // 8
    text_dim, size = config.unet.context_dim, config.clip.image_size
    with torch.no_grad():  # the CLIP tokens' shape, [1, N, width], from the vision tower itself
        clip_shape = model.embedder(torch.empty(1, 3, size, size, device=meta, dtype=frozen)).shape[1:]
    batch = EncodedBatch(torch.empty(b, 4, t, h, w, device=meta), torch.empty(b, 77, text_dim, device=meta),
                         torch.empty(b, *clip_shape, device=meta))
    null = NullConditioning(torch.empty(1, 77, text_dim, device=meta), torch.empty(1, *clip_shape, device=meta))
    draws = dict(timesteps=torch.zeros(b, dtype=torch.long, device=meta),
                 noise=torch.empty(b, 4, t, h, w, device=meta), cond_frame=torch.zeros(b, dtype=torch.long, device=meta),
                 drop_text=torch.zeros(b, dtype=torch.bool, device=meta),
                 drop_image=torch.zeros(b, dtype=torch.bool, device=meta))
    fs = torch.zeros(b, dtype=torch.long, device=meta)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    counter = _LiveBytes()
    with _fused_attention(), counter:
        for _ in range(steps):
            module(batch, fs, null=null, **draws).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return MemoryEstimate(weights=weights, peak=weights + counter.peak, trained_values=sum(p.numel() for p in params))
