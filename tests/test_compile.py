"""Compiling the UNet: regional compilation of its repeated blocks, graph counts, no recompilation, same latents.

Dynamo's graph capture and guards run with the eager backend, or a backend that counts the graphs
it is given and runs them as traced: Inductor's CPU code generation takes minutes on two cores and
says nothing about the GPU's kernels (its compile times are in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dynamicrafter.bench import generation as bench
from dynamicrafter.checkpoints import load_model
from dynamicrafter.configs import load_config
from dynamicrafter.models.unet import UNet3D
from dynamicrafter.runtime import COMPILE_MODES, CompiledModule, compile_mode

from .conftest import DATA, TINY_NAMES, relative_error, tiny_pipeline

FAST = dict(num_inference_steps=2, num_frames=3, height=64, width=64)


class Graphs:
    """A ``torch.compile`` backend that keeps every graph it is given and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(graph)
        return graph.forward


@pytest.fixture
def dynamo():
    """Dynamo with no compiled code left from other tests (its caches live on the functions' code)."""
    torch._dynamo.reset()
    yield torch._dynamo
    torch._dynamo.reset()


@pytest.fixture
def eager_backend(monkeypatch, tmp_path) -> Graphs:
    """Every ``torch.compile`` of the library goes to a counting backend; Inductor's cache to a temporary folder."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    backend = Graphs()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, dynamic=kw["dynamic"]))
    return backend


def private_unet(name: str) -> UNet3D:
    """Tiny model ``name``'s UNet loaded afresh (compiling changes the blocks; the session's copy is shared)."""
    return load_model(load_config(DATA / f"{name}.yaml"), DATA / f"{name}.ckpt").unet


def unet_inputs(unet: UNet3D, frames: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A guided call's inputs: ``x`` ``[2, 8, frames, 8, 8]``, timesteps, text + per-frame image tokens."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    context = torch.randn(2, cfg.text_context_len + frames * cfg.image_tokens_per_frame, cfg.context_dim, generator=gen)
    return torch.randn(2, cfg.in_channels, frames, 8, 8, generator=gen), torch.tensor([999, 999]), context


def block_calls(unet: UNet3D, *inputs: torch.Tensor) -> list[tuple[torch.nn.Module, tuple]]:
    """Each repeated block's call in an eager run of ``unet`` on ``inputs``, in order: (block, arguments)."""
    calls: list[tuple[torch.nn.Module, tuple]] = []
    hooks = [block.register_forward_pre_hook(lambda block, args: calls.append((block, args)) and None)
             for block in unet.modules() if type(block) in unet.repeated_blocks]
    try:
        with torch.no_grad():
            unet(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def signature(block: torch.nn.Module, args: tuple) -> tuple:
    """What a static-shape graph of ``block`` depends on: its class, weight shapes, argument shapes, strides, values."""
    def describe(arg: object) -> object:
        return (tuple(arg.shape), arg.stride(), arg.dtype) if isinstance(arg, torch.Tensor) else arg

    return type(block), tuple(tuple(p.shape) for p in block.parameters()), tuple(map(describe, args))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_each_block_class_is_one_graph_without_breaks(name):
    """``torch._dynamo.explain`` of every repeated block class: one graph, no break (the fused norm switched on too)."""
    unet = private_unet(name)
    first_call = {}
    for block, args in block_calls(unet, *unet_inputs(unet)):
        first_call.setdefault(type(block), (block, args))
    assert set(first_call) == set(UNet3D.repeated_blocks)
    block, args = first_call[UNet3D.repeated_blocks[0]]
    checks = [*first_call.values(), (block, (*args[:-1], True))]  # a ResBlock with fused_norm on
    with torch.no_grad():
        for block, args in checks:
            explained = torch._dynamo.explain(block)(*args)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (
                f"{type(block).__name__}: {explained.break_reasons}")


def test_regional_compilation_makes_one_graph_per_distinct_block_and_reuses_it(dynamo):
    unet = private_unet("tiny256")
    keys = list(unet.state_dict())
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(*inputs)
    distinct = {signature(block, args) for block, args in block_calls(unet, *inputs)}
    backend = Graphs()
    compiled = CompiledModule(unet, "regional", backend=backend)
    assert len(compiled.blocks) == 55 and len(distinct) == 27  # 22 ResBlocks, 16 spatial, 17 temporal transformers
    with torch.no_grad():
        assert torch.equal(compiled(*inputs), expected)
        assert len(backend.graphs) == len(distinct)  # one graph per distinct block, more than Dynamo's limit of 8
        other_values = unet_inputs(unet, seed=1)
        with torch.compiler.set_stance("fail_on_recompile"):  # the next call of that size: other values, no graph
            compiled(other_values[0], torch.tensor([3, 3]), other_values[2])
    assert len(backend.graphs) == len(distinct)
    assert dynamo.config.recompile_limit == 8  # raised during the UNet's calls only
    assert list(unet.state_dict()) == keys  # the checkpoint's key names
    compiled.restore()
    assert not any("forward" in block.__dict__ for block in unet.modules())
    with torch.no_grad():
        assert torch.equal(unet(*inputs), expected)


def test_compile_modes():
    assert compile_mode(False) is None and compile_mode(None) is None  # off unless asked for
    assert compile_mode(True) == "regional" and COMPILE_MODES[0] == "regional"
    assert compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="Unknown compile mode 'fast'"):
        compile_mode("fast")


def test_compiled_pipeline_gives_the_same_latents_and_compiles_once_per_size(dynamo, eager_backend, tmp_path, caplog):
    """``compile=True`` compiles the blocks once; the next call of that size compiles nothing; other modes still work."""
    eager = tiny_pipeline("tiny256", dtype="float32")
    pipe = tiny_pipeline("tiny256", dtype="float32", compile=True)
    assert pipe.compile_mode == "regional"
    image = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    args = dict(latents=noise, eta=0.0, output_type="latent", **FAST)
    with caplog.at_level(logging.INFO, logger="dynamicrafter.runtime"):
        ours = pipe(image, "x", **args)["videos"]
    compiling = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert compiling == [f"Compiling the UNet's repeated blocks for input 2x8x3x8x8 (mode regional): once per size; "
                         f"kernels are cached in {tmp_path / 'inductor'}."]  # batch 2: both guidance branches
    assert relative_error(ours, eager(image, "x", **args)["videos"]) < 1e-4
    graphs = len(eager_backend.graphs)
    assert graphs == 27  # the distinct blocks of the test above
    with torch.compiler.set_stance("fail_on_recompile"):  # other steps, prompt and scale: nothing compiles
        again = pipe(image, "another prompt", **{**args, "num_inference_steps": 3, "guidance_scale": 4.0})["videos"]
    assert len(eager_backend.graphs) == graphs and torch.isfinite(again).all()

    assert pipe.compile_unet("default") == "default"  # the whole UNet as one graph
    assert not any("forward" in block.__dict__ for block in pipe.model.unet.modules())
    assert relative_error(pipe(image, "x", **args)["videos"], ours) < 1e-4
    assert len(eager_backend.graphs) == graphs + 1
    assert pipe.compile_unet(False) is None and pipe._unet_forward is pipe.model.unet


def test_benchmark_times_the_first_compiled_video_against_the_eager_one(dynamo, eager_backend, tmp_path, capsys,
                                                                         caplog, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))  # restored after the run sets it
    code = bench.main(["--config", str(DATA / "tiny256.yaml"), "--frames", "2", "--steps", "2", "--device", "cpu",
                       "--dtype", "float32", "--first-compiled-video", "--compile-cache", str(cache), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compile"] is None and report["compiled_graphs"] == 0  # the eager figures come first
    assert report["compiled_after_eager"] == "regional" and report["compile_cache_dir"] == str(cache)
    assert report["compile_cache_files"] == 0 and report["first_compiled_graphs"] == len(eager_backend.graphs) > 0
    assert report["second_video_recompilations"] == 0
    assert report["first_compiled_over_eager"] == pytest.approx(report["first_compiled_video_s"] / report["eager_video_s"])
    assert report["second_compiled_over_eager"] > 0
    assert bench.main(["--first-compiled-video", "--compile"]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "--first-compiled-video compiles the UNet after timing it eagerly; leave out --compile and --compile-mode."]
