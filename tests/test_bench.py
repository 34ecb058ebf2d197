"""The benchmark command: its JSON report and its FLOP count; the measurement tools apart from the library."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from dynamicrafter.bench import generation as bench
from dynamicrafter.bench import timing
from dynamicrafter.configs import get_config, load_config
from dynamicrafter.errors import UserError

from .conftest import DATA


def test_json_report_on_the_tiny_model(capsys):
    """The report's figures; --profile sums one UNet call's time by kind; --channels-last off is what runs."""
    code = bench.main(["--config", str(DATA / "tiny256.yaml"), "--frames", "2", "--steps", "2",
                       "--device", "cpu", "--dtype", "float32", "--channels-last", "off", "--profile", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("s_per_step", "s_per_video", "peak_mem_bytes", "tflops", "device_name"):
        assert key in report
    assert 0 < report["s_per_step"] < report["s_per_video"]
    assert report["peak_mem_bytes"] > 0 and report["tflops"] > 0 and 0 < report["matmul_share"]
    assert report["dtype"] == "float32" and report["offload"] == "none"
    assert report["compile"] is None and report["recompilations"] == 0 and report["warmup_s"] > 0
    assert report["channels_last"] is False and report["device"] == "cpu"
    profile = report["profile"]
    kinds = profile["by_category"]
    assert {"convolution", "matmul", "attention", "norm"} <= set(kinds)
    assert sum(entry["ms"] for entry in kinds.values()) == pytest.approx(profile["total_ms"])
    assert sum(entry["share"] for entry in kinds.values()) == pytest.approx(1.0)
    assert profile["top"] and all(entry["ms"] > 0 for entry in profile["top"])


@pytest.mark.parametrize(("resolution", "tflop"), [("256", 4.90), ("512", 12.6), ("1024", 52.3)])
def test_unet_flops_of_the_released_models(resolution, tflop):
    """One UNet call, batch 1, 16 frames: the figures the original's profile gives."""
    flops = timing.unet_flops(get_config(resolution), frames=16, batch=1)
    assert flops / 1e12 == pytest.approx(tflop, rel=5e-3)


def test_random_model_has_the_real_shapes_and_runs_finite():
    import torch

    from dynamicrafter.configs import load_config

    from .conftest import load_tiny

    model = timing.random_model(load_config(DATA / "tiny256.yaml"), torch.device("cpu"), torch.float32)
    real = load_tiny("tiny256").model.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in real.items()}
    v = load_tiny("tiny256").vectors
    out = model.unet(v["unet.x"], v["unet.t"], v["unet.context"], v["unet.fs"])
    assert torch.isfinite(out).all() and out.abs().max() > 0


def errors(caplog) -> list[str]:
    """The messages logged as errors so far, then forgotten."""
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    return messages


def test_bad_arguments_exit_with_a_message(caplog):
    assert bench.main(["--steps", "1"]) == 2
    assert errors(caplog) == ["--num_inference_steps must be at least 2 (the first step is the warm-up)."]
    assert bench.main(["999"]) == 2
    (message,) = errors(caplog)
    assert "unknown resolution '999'" in message


def test_flags_share_the_command_lines_names():
    args = bench.build_parser().parse_args(["512", "--num_inference_steps", "7", "--video_length", "3", "--offload",
                                            "model", "--compile"])
    assert (args.resolution, args.num_inference_steps, args.num_frames, args.offload, args.compile) == (
        "512", 7, 3, "model", True)
    old = bench.build_parser().parse_args(["--resolution", "320_512", "--steps", "7", "--frames", "3"])
    assert (old.resolution_flag, old.num_inference_steps, old.num_frames, old.compile) == ("512", 7, 3, False)
    assert bench.build_parser().parse_args(["--compile", "--no-compile"]).compile is False
    graphs = bench.build_parser().parse_args(["--compile-mode", "reduce-overhead"])
    assert (graphs.compile, graphs.compile_mode) == (False, "reduce-overhead")


def test_fused_norm_setting_and_whether_it_ran(monkeypatch):
    import torch

    from dynamicrafter.models import fused_norm
    from dynamicrafter.models import unet as unet_module

    from .conftest import load_tiny

    assert bench.build_parser().parse_args([]).fused_norm == "auto"
    unet = load_tiny("tiny256").model.unet
    monkeypatch.setattr(unet, "fused_norm", None)
    pipe = type("Pipe", (), {"model": load_tiny("tiny256").model, "compile_mode": None})()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(fused_norm, "triton_available", lambda: True)
    assert not timing.fused_norm_used(pipe, cuda)  # auto: the library's default, off until timed on a GPU
    monkeypatch.setattr(unet_module, "FUSED_NORM_BY_DEFAULT", True)
    assert timing.fused_norm_used(pipe, cuda) and not timing.fused_norm_used(pipe, cpu)
    pipe.compile_mode = "default"
    assert not timing.fused_norm_used(pipe, cuda)  # Inductor's own fusion instead
    pipe.compile_mode = None
    for setting, used in (("on", True), ("off", False)):
        unet.fused_norm = bench.FUSED_NORM_SETTINGS[setting]
        assert timing.fused_norm_used(pipe, cuda) is used
    monkeypatch.setattr(fused_norm, "triton_available", lambda: False)
    assert not timing.fused_norm_used(pipe, cuda)


def test_checkpoint_run_counts_the_flops_of_the_model_it_times(capsys):
    code = bench.main(["256", "--config", str(DATA / "tiny256.yaml"), "--checkpoint", str(DATA / "tiny256.ckpt"),
                       "--frames", "2", "--steps", "2", "--device", "cpu", "--dtype", "float32", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    tiny = timing.unet_flops(load_config(DATA / "tiny256.yaml"), frames=2, batch=2)
    assert report["unet_tflop_per_step"] == pytest.approx(tiny / 1e12)


def test_dynamicrafter_bench_runs_the_benchmark(caplog):
    from dynamicrafter.__main__ import main

    assert main(["bench", "--steps", "1"]) == 2
    assert errors(caplog) == ["--num_inference_steps must be at least 2 (the first step is the warm-up)."]


def _imports(path: Path, root: Path) -> set[str]:
    """The absolute names of the modules (and names from them) that the file at ``path`` imports."""
    parts = path.relative_to(root).with_suffix("").parts
    package = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else ())
            module = ".".join(filter(None, (base, node.module)))
            names.update({module} | {f"{module}.{alias.name}" for alias in node.names})
    return names


def test_the_library_imports_no_measurement_tool_and_the_tools_no_checkout_path():
    """Outside dynamicrafter/bench only the two command shims name it; no tool finds files from its own path."""
    package = Path(bench.__file__).parents[1]
    shims = {package / "bench_suite.py", package / "training" / "bench.py"}
    for path in package.rglob("*.py"):
        if package / "bench" in path.parents:
            assert "Path(__file__)" not in path.read_text(), path
        elif path not in shims:
            tools = {n for n in _imports(path, package.parent) if n.startswith("dynamicrafter.bench")}
            assert not tools, f"{path} imports {tools}"
    assert _imports(package / "bench" / "training.py", package.parent) >= {  # relative imports, one and two levels up
        "dynamicrafter.bench.timing.random_model", "dynamicrafter.training.trainer.train"}


def test_compare_reference_refuses_a_folder_without_the_original(tmp_path, caplog):
    """Checked before any model is built; the original is never needed by the tests."""
    assert bench.main(["--compare-reference", str(tmp_path), "--steps", "2"]) == 2
    assert errors(caplog) == [f"--compare-reference: {tmp_path} is not a DynamiCrafter checkout "
                              "(it has no lvdm/modules/networks/openaimodel3d.py)."]


def test_compare_reference_reports_an_unimportable_original_in_one_line(tmp_path):
    import sys

    source = tmp_path / bench.REFERENCE_UNET
    source.parent.mkdir(parents=True)
    source.write_text("import a_module_that_is_not_installed\n")
    try:
        with pytest.raises(UserError) as info:
            timing.reference_unet(None, tmp_path, None)
    finally:
        for name in [n for n in sys.modules if n == "lvdm" or n.startswith("lvdm.")]:
            del sys.modules[name]
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "No module named 'a_module_that_is_not_installed'" in message
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(("name", "kind"), [
    ("aten::cudnn_convolution", "convolution"), ("sm90_xmma_fprop_implicit_gemm_bf16bf16_f32", "convolution"),
    ("aten::addmm", "matmul"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>", "norm"),
    ("aten::native_group_norm", "norm"), ("aten::silu", "activation"),
    ("void at::native::direct_copy_kernel_cuda", "copy"), ("aten::cat", "copy"), ("aten::add", "elementwise"),
    ("aten::view", "other"),
])
def test_profile_categories(name, kind):
    from dynamicrafter.bench.profiling import category

    assert category(name) == kind


def test_profile_on_cuda_sums_the_kernels_by_kind(monkeypatch):
    """On CUDA the kernels' own times are summed (the CPU-side operators that launched them are not)."""
    import types

    import torch

    from dynamicrafter.bench import profiling

    def event(name, us, device_type):
        return types.SimpleNamespace(name=name, device_type=device_type,
                                     time_range=types.SimpleNamespace(elapsed_us=lambda: us))

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    class FakeProfile:
        def __init__(self, activities):
            assert profiling.ProfilerActivity.CUDA in activities

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [event("sm90_xmma_fprop_implicit_gemm_bf16", 300, cuda), event("aten::conv2d", 999, cpu),
                    event("pytorch_flash::flash_fwd_kernel", 100, cuda), event("sm90_xmma_fprop_implicit_gemm_bf16",
                                                                               200, cuda)]

    monkeypatch.setattr(profiling, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    report = profiling.profile_call(lambda: None, torch.device("cuda", 0))
    assert report["total_ms"] == pytest.approx(0.6)
    assert report["by_category"] == {"convolution": {"ms": pytest.approx(0.5), "share": pytest.approx(5 / 6), "calls": 2},
                                     "attention": {"ms": pytest.approx(0.1), "share": pytest.approx(1 / 6), "calls": 1}}
    assert report["top"][0] == {"name": "sm90_xmma_fprop_implicit_gemm_bf16", "ms": pytest.approx(0.5), "calls": 2}


def test_text_report_ends_with_the_profile_table(monkeypatch, capsys):
    """Without --json: one aligned line per figure, then the profile by kind of operation."""
    profile = {"total_ms": 12.5, "by_category": {"convolution": {"ms": 10.0, "share": 0.8, "calls": 4},
                                                 "norm": {"ms": 2.5, "share": 0.2, "calls": 3}}, "top": []}
    monkeypatch.setattr(timing, "run", lambda args: {"device": "cuda", "s_per_step": 0.1372, "profile": profile})
    assert bench.main(["--profile"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "                device: cuda",
        "            s_per_step: 0.1372",
        "",
        "One UNet call, 12.5 ms of GPU kernels:",
        "           convolution:      10.0 ms  80.0% (4 calls)",
        "                  norm:       2.5 ms  20.0% (3 calls)",
    ]


def test_fused_norm_micro_benchmark_says_what_it_needs(capsys, monkeypatch):
    import torch

    from dynamicrafter.models import fused_norm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fused_norm.main(["--bench"]) == 1
    assert capsys.readouterr().err == "fused_norm --bench needs a CUDA GPU and Triton; none here.\n"
