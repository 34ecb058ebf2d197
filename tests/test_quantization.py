"""Float8 weights for the UNet (``quantize=``, dynamicrafter.quantization) on the tiny model, on the CPU.

Only ``fp8_weights`` runs here; ``fp8`` needs a CUDA GPU of compute capability 8.9+, so only its
refusals are tested. Tolerances are relative L2 differences of the latents to the unquantized
model's from the same noise (measured: 0.019 in float32 and 0.022 in bfloat16 for these
settings).
"""

from __future__ import annotations

import copy
import json
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dynamicrafter import cli
from dynamicrafter.bench import generation as bench
from dynamicrafter.bench import timing
from dynamicrafter.checkpoints import load_model
from dynamicrafter.configs import load_config
from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline, GenerationError
from dynamicrafter.quantization import quantizable, quantize_mode, quantize_unet, weight_bytes

from .conftest import DATA, make_image, read_video, relative_error, tiny_args

pytest.importorskip("torchao")

#: Latent difference allowed after quantizing: about 2.5x the measured one.
LATENT_TOL = 0.05
IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
CPU = torch.device("cpu")


def tiny_model():
    """A private copy of the tiny 256 model (float32, CPU): quantizing changes it in place."""
    return load_model(load_config(DATA / "tiny256.yaml"), DATA / "tiny256.ckpt")


def latents(pipe) -> torch.Tensor:
    return pipe(IMAGE, "a cat", num_inference_steps=2, num_frames=2, output_type="latent",
                generator=torch.Generator().manual_seed(1))["videos"]


def is_float8(tensor: torch.Tensor) -> bool:
    from torchao.quantization import Float8Tensor

    return isinstance(tensor, Float8Tensor) and tensor.qdata.dtype == torch.float8_e4m3fn


@pytest.fixture(scope="module")
def pair():
    """The unquantized pipeline's latents and a pipeline with fp8_weights (float32)."""
    reference = latents(DynamiCrafterImg2VideoPipeline.from_model(tiny_model(), "cpu", torch.float32))
    return reference, DynamiCrafterImg2VideoPipeline.from_model(tiny_model(), "cpu", torch.float32,
                                                                quantize="fp8_weights")


def test_fp8_weights_quantize_the_unets_linear_layers_only(pair):
    reference, pipe = pair
    unet = pipe.model.unet
    linears = [m for m in unet.modules() if isinstance(m, nn.Linear)]
    assert pipe.quantize == "fp8_weights" and linears and all(is_float8(m.weight) for m in linears)
    assert unet.time_embed[0].weight.dtype == torch.float32  # reports the model's dtype
    others = [pipe.model.vae, pipe.model.cond_stage_model, pipe.model.embedder, pipe.model.image_proj_model]
    assert not any(is_float8(p) for module in others for p in module.parameters())
    assert not any(is_float8(m.weight) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    err = relative_error(latents(pipe), reference)
    assert 0 < err < LATENT_TOL, f"fp8_weights vs float32 latents: {err:.3g}"


def test_which_layers_qualify():
    assert quantizable(nn.Linear(32, 64), "ff.net.2")
    assert not quantizable(nn.Linear(20, 64), "proj")  # torchao's float8 matmul needs multiples of 16
    assert not quantizable(nn.Linear(32, 8), "proj")
    assert not quantizable(nn.Linear(32, 32), "attn1.to_q.lora_A.default")  # LoRA layers keep their dtype
    assert not quantizable(nn.Conv2d(32, 32, 1), "conv")
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 20))
    before = weight_bytes(model)
    assert quantize_unet(model, "fp8_weights", CPU, torch.float32) == 1
    assert is_float8(model[0].weight) and not is_float8(model[1].weight) and not quantizable(model[0], "0")
    assert weight_bytes(model) == before - 32 * 32 * 3 + 32 * 4  # float8 data plus one float32 scale per row
    assert quantize_unet(model, "none", CPU, torch.float32) == 0


def test_bfloat16_model_and_the_log_line(caplog):
    reference = DynamiCrafterImg2VideoPipeline.from_model(tiny_model(), "cpu", torch.bfloat16)
    expected = latents(reference)
    before = weight_bytes(reference.model.unet)
    with caplog.at_level(logging.INFO):
        assert reference.quantize_unet("fp8_weights") > 0
    assert weight_bytes(reference.model.unet) < before
    err = relative_error(latents(reference), expected)
    assert 0 < err < LATENT_TOL, f"fp8_weights vs bfloat16 latents: {err:.3g}"
    assert any(r.getMessage().startswith("Quantized 452 of the UNet's 452 linear layers to float8 (weights only)")
               for r in caplog.records)
    with pytest.raises(ValueError, match=r"already quantized \(fp8_weights\); load the pipeline again"):
        reference.quantize_unet("fp8_weights")


def test_lora_loads_over_float8_weights(pair, tmp_path):
    from dynamicrafter.lora import add_lora, lora_state_dict, save_lora

    _, pipe = pair
    unet = copy.deepcopy(tiny_model().unet)
    lora_config = add_lora(unet, rank=4, targets=("to_q", "to_v"))  # a few layers: peft is slow to wrap
    generator = torch.Generator().manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the LoRA an effect
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    save_lora(tmp_path / "lora", lora_state_dict(unet), lora_config, pipe.config)
    base = latents(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    try:
        assert relative_error(latents(pipe), base) > 1e-3  # the LoRA acts
        pipe.load_lora_weights(tmp_path / "lora", scale=0.0)
        assert torch.equal(latents(pipe), base)
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(latents(pipe), base) and is_float8(pipe.model.unet.time_embed[0].weight)


def test_host_kept_unet_is_lent_with_its_float8_weights(pair, monkeypatch):
    """offload='model' (forced here: on the CPU nothing is offloaded) swaps the float8 parameters in per use."""
    import dynamicrafter.pipeline as pipeline

    reference, _ = pair
    monkeypatch.setattr(pipeline, "offload_mode", lambda offload, device: "model")
    pipe = DynamiCrafterImg2VideoPipeline.from_model(tiny_model(), "cpu", torch.float32, quantize="fp8_weights",
                                                     offload="model")
    assert pipe.offload == "model" and any(pipe.model.unet is m for m in pipe._offloader.on_host)
    assert relative_error(latents(pipe), reference) < LATENT_TOL
    weight = pipe.model.unet.time_embed[0].weight
    assert is_float8(weight) and is_float8(weight.detach().to("meta")) and is_float8(weight.to(torch.float16))


def test_non_finite_output_of_a_float8_unet_is_not_redone(pair):
    _, pipe = pair

    def poison(pipe, step, t, tensors):
        return {"latents": torch.full_like(tensors["latents"], float("nan"))}

    with pytest.raises(GenerationError, match=r"float8 UNet \(quantize=fp8_weights\) produced NaN"):
        pipe(IMAGE, "x", num_inference_steps=1, num_frames=2, output_type="latent", callback_on_step_end=poison)


def test_refusals_are_one_sentence(monkeypatch):
    with pytest.raises(ValueError, match=r"fp8' needs a CUDA GPU of compute capability 8.9 or newer .* not cpu; "
                                         r"quantize='fp8_weights' works on any device\.$"):
        quantize_mode("fp8", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match=r"Unknown quantize mode 'int4'; choose one of: none, fp8, fp8_weights\.$"):
        quantize_mode("int4", CPU, torch.float32)
    assert quantize_mode(None, CPU, torch.float32) == quantize_mode(False, CPU, torch.float32) == "none"
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match=r"cuda:0 \(NVIDIA A100\) has 8.0; use quantize='fp8_weights'\.$"):
        quantize_mode("fp8", gpu, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    with pytest.raises(ValueError, match=r"computes in bfloat16 .* not float32; use dtype bfloat16, or quantize="):
        quantize_mode("fp8", gpu, torch.float32)
    with pytest.raises(ValueError, match="mps backend has no float8 tensors"):
        quantize_mode("fp8_weights", torch.device("mps"), torch.float16)


def test_missing_torchao_is_one_sentence_before_any_model_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao...` raise ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = nn.Linear(16, 16)
    with pytest.raises(ValueError, match=r"needs the torchao package; pip install torchao \(or pip install "
                                         r"'dynamicrafter\[fp8\]'\)\.$"):
        DynamiCrafterImg2VideoPipeline.from_model(model, "cpu", torch.float32, quantize="fp8_weights")
    assert quantize_mode("none", CPU, torch.float32) == "none"  # not needed without quantization


def test_command_line_quantize_runs_end_to_end(tmp_path, caplog):
    image = make_image(tmp_path / "a.png")
    with caplog.at_level(logging.INFO):
        code = cli.main(["256", *tiny_args("tiny256"), "--device", "cpu", "--dtype", "float32", "--quantize",
                         "fp8_weights", "--image_path", str(image), "--prompt_text", "x", "--output_dir",
                         str(tmp_path / "out")])
    assert code == 0
    assert read_video(tmp_path / "out" / "a.mp4")[:2] == ("h264", 4)
    assert any("quantize: fp8_weights)" in r.getMessage() for r in caplog.records)


def test_command_line_refuses_fp8_off_a_capable_gpu(tmp_path, caplog):
    code = cli.main(["256", "--device", "cpu", "--quantize", "fp8", "--image_path", str(make_image(tmp_path / "a.png")),
                     "--output_dir", str(tmp_path / "out")])
    assert code == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message.startswith("quantize='fp8' needs a CUDA GPU") and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before the output folder or the model


def test_app_refuses_fp8_off_a_capable_gpu_before_loading(tmp_path, monkeypatch, caplog):
    pytest.importorskip("gradio")
    from dynamicrafter.app import main

    monkeypatch.chdir(tmp_path)  # no checkpoint here: the refusal must come before the download
    assert main(["256", "--device", "cpu", "--quantize", "fp8"]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message.startswith("quantize='fp8' needs a CUDA GPU") and message.endswith("works on any device.")


def test_bench_reports_the_latent_difference(capsys, monkeypatch, caplog):
    monkeypatch.setattr(timing, "matmul_tflops", lambda device, dtype: 1.0)  # the CPU matmul takes seconds
    code = bench.main(["--config", str(DATA / "tiny256.yaml"), "--checkpoint", str(DATA / "tiny256.ckpt"), "--frames",
                       "1", "--steps", "2", "--device", "cpu", "--dtype", "float32", "--quantize", "fp8_weights",
                       "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantize"] == "fp8_weights" and report["quantized_layers"] == 452
    assert 0 < report["quantized_latent_rel_diff"] < LATENT_TOL
    assert report["unet_weight_bytes"] < report["unquantized_unet_weight_bytes"]
    assert bench.main(["--quantize", "fp8", "--compare-reference", "x", "--steps", "2"]) == 2
    assert "leave out --quantize" in caplog.text
