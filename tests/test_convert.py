"""``dynamicrafter convert``: release key names, dtypes, without the towers, atomic, streaming."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynamicrafter import checkpoints as checkpoints_module
from dynamicrafter.checkpoints import CLIP_TOWERS, load_model
from dynamicrafter.configs import load_config
from dynamicrafter.convert import convert, main, schedule_keys

from .conftest import DATA, load_tiny, relative_error

CKPT = DATA / "tiny256.ckpt"
TOWERS = CLIP_TOWERS
ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _outputs(model) -> dict[str, torch.Tensor]:
    v = load_tiny("tiny256").vectors
    with torch.no_grad():
        return {"text": model.encode_text(["a tiny robot"]), "image": model.encode_image_tokens(v["image.input"]),
                "unet": model.unet(v["unet.x"], v["unet.t"], v["unet.context"], v["unet.fs"]),
                "latents": model.encode_latents(v["image.input"])}


def _dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip(dtype, release_state, config256, tmp_path) -> None:
    out = convert(CKPT, tmp_path / "tiny256.safetensors", dtype=dtype)
    stored = load_file(str(out))  # the safetensors library reads (and validates) what we streamed
    assert set(stored) == set(release_state)  # release names: framestride_embed stays
    assert any(".framestride_embed." in k for k in stored)
    for key, value in release_state.items():
        expected = value.float() if key in schedule_keys() else value.to(dtype)
        assert stored[key].dtype == expected.dtype and torch.equal(stored[key], expected), key
    assert {d for k, d in _dtypes(out).items() if k not in schedule_keys()} == {ST_DTYPES[dtype]}
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # The tiny weights are float16 values, so every dtype but bfloat16 gives the same model (float32
    # weights used in place from the file's mapping may take other SIMD paths: 1e-6, not bit-equal).
    ours, full = _outputs(load_model(config256, out)), _outputs(load_tiny("tiny256").model)
    for name in full:
        error = relative_error(ours[name], full[name])
        assert error < (2e-2 if dtype == torch.bfloat16 else 1e-6), (name, error)
    # Converting the converted file again changes nothing.
    again = convert(out, tmp_path / "again.safetensors", dtype=dtype)
    assert again.read_bytes() == out.read_bytes()


def test_without_clip_then_load_with_open_clip_weights(release_state, config256, tmp_path) -> None:
    pruned = convert(CKPT, tmp_path / "pruned.safetensors", without_clip=True)
    keys = set(_dtypes(pruned))
    assert keys == {k for k in release_state if not k.startswith(TOWERS)}
    clip = tmp_path / "clip.safetensors"  # the towers as an open_clip state dict
    text = {k[len("cond_stage_model.model."):]: v for k, v in release_state.items()
            if k.startswith("cond_stage_model.model.")}
    visual = {k[len("embedder.model."):]: v for k, v in release_state.items() if k.startswith("embedder.model.visual.")}
    save_file({k: v.contiguous() for k, v in {**text, **visual}.items()}, str(clip))
    ours = _outputs(load_model(config256, pruned, clip_checkpoint=clip))
    full = _outputs(load_tiny("tiny256").model)
    assert all(torch.equal(ours[k], full[k]) for k in full)


def test_refuses_to_overwrite(tmp_path, caplog) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    assert main([str(CKPT), str(target)]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{target} already exists; pass --overwrite to replace it."]
    assert target.read_bytes() == b"keep me"
    assert main([str(CKPT), str(target), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert set(_dtypes(target).values()) == {"BF16", "F32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_failure_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")
    write = checkpoints_module.write_safetensors

    def write_until_the_disk_is_full(path, layout, tensor, metadata=None, written=None):
        done = []

        def third_fails(name):
            done.append(name)
            if len(done) == 3:
                raise OSError(28, "No space left on device")
            return tensor(name)

        return write(path, layout, third_fails, metadata, written)

    monkeypatch.setattr(checkpoints_module, "write_safetensors", write_until_the_disk_is_full)
    with pytest.raises(ValueError, match=r"^Cannot write .*out.safetensors \(No space left on device\)\.$"):
        convert(CKPT, target, overwrite=True)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_float16_overflow_is_refused(release_state, tmp_path) -> None:
    key = "model.diffusion_model.out.2.bias"
    source = tmp_path / "big.safetensors"
    save_file({k: (v.float() * 1e6 if k == key else v).contiguous() for k, v in release_state.items()}, str(source))
    with pytest.raises(ValueError) as info:
        convert(source, tmp_path / "out.safetensors")
    assert str(info.value).startswith(f"{key} has values beyond the range of float16 (largest ")
    assert str(info.value).endswith("; convert with --dtype bfloat16 or float32.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    convert(source, tmp_path / "out.safetensors", dtype=torch.bfloat16)


@pytest.mark.parametrize("argv, code, message", [
    (["{ckpt}", "{tmp}/out.ckpt"], 1, "The output {tmp}/out.ckpt must be a .safetensors file."),
    (["{tmp}/missing.ckpt", "{tmp}/out.safetensors"], 1, "Checkpoint {tmp}/missing.ckpt does not exist."),
    (["{tmp}/lora.safetensors", "{tmp}/out.safetensors"], 1,
     "{tmp}/lora.safetensors is a LoRA adapter (2 tensors such as x.lora_A.weight), not a model checkpoint; "
     "give the full model's checkpoint instead."),
    (["{ckpt}", "{tmp}"], 1, "The output {tmp} must be a .safetensors file."),
    (["{ckpt}", "{tmp}/out.safetensors", "--dtype", "int8"], 2, "--dtype: invalid choice: 'int8' (choose"),
    (["{ckpt}"], 2, "The following arguments are required: output."),
])
def test_errors_are_one_line(argv, code, message, tmp_path, caplog) -> None:
    save_file({"x.lora_A.weight": torch.zeros(2), "x.lora_B.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    before = sorted(tmp_path.iterdir())
    fill = {"{ckpt}": str(CKPT), "{tmp}": str(tmp_path)}
    for old, new in fill.items():
        argv = [a.replace(old, new) for a in argv]
        message = message.replace(old, new)
    assert main(argv) == code
    (logged,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged == message or (logged.startswith(message) and "\n" not in logged and logged.endswith(".")), logged
    assert sorted(tmp_path.iterdir()) == before


_PEAK_SCRIPT = r"""
import json, sys
from dynamicrafter.convert import main

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

main([sys.argv[3], sys.argv[2]])  # warm-up: the first conversion's one-off allocations
before = peak_kb()
code = main([sys.argv[1], sys.argv[2], "--dtype", "float16", "--overwrite"])
after = peak_kb()
# float16 to float16: written straight from the mapped file, whose pages are released as it goes.
again = main([sys.argv[2], sys.argv[2] + ".again.safetensors"])
print(json.dumps({"code": code, "growth_kb": after - before, "again": again, "growth_again_kb": peak_kb() - after}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streams_tensor_by_tensor(tmp_path, record_property) -> None:
    """128 float32 tensors of 1 MiB to float16 (a 64 MiB output): the peak stays far below the output's size.

    Measured: about 10 MiB (the allocator's reuse of a few freed tensors); the safetensors
    library's own writer would hold the whole 64 MiB output at once.
    """
    source, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    save_file({f"model.diffusion_model.w{i:03d}": torch.full((256, 1024), i / 3) for i in range(128)}, str(source))
    save_file({"model.diffusion_model.w": torch.zeros(16)}, str(small))
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(source), str(tmp_path / "out.safetensors"),
                             str(small)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    growth_mib, again_mib = numbers["growth_kb"] / 1024, numbers["growth_again_kb"] / 1024
    record_property("peak_rss_growth_mib", round(growth_mib, 1))
    record_property("peak_rss_growth_fp16_to_fp16_mib", round(again_mib, 1))
    assert numbers["code"] == 0 and numbers["again"] == 0
    assert growth_mib < 32, f"peak RSS grew {growth_mib:.1f} MiB writing a 64 MiB file"
    assert again_mib < 16, f"peak RSS grew {again_mib:.1f} MiB more copying a 64 MiB float16 file"
    stored = load_file(str(tmp_path / "out.safetensors"))
    assert len(stored) == 128 and all(v.dtype == torch.float16 for v in stored.values())
    assert torch.equal(stored["model.diffusion_model.w127"], torch.full((256, 1024), 127 / 3, dtype=torch.float16))


def test_bench_load_random_files_load(config256, tmp_path) -> None:
    """The loading benchmark's random checkpoint (release names) and OpenCLIP file load like the real ones."""
    from dynamicrafter.bench.load import write_random_checkpoint, write_random_open_clip

    full, pruned, clip = tmp_path / "full.safetensors", tmp_path / "pruned.safetensors", tmp_path / "clip.safetensors"
    write_random_checkpoint(config256, full, torch.float16)
    write_random_checkpoint(config256, pruned, torch.float16, without_clip=True)
    write_random_open_clip(config256, clip)
    assert set(_dtypes(full)) == set(torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"])
    assert not any(k.startswith(TOWERS) for k in _dtypes(pruned))
    assert {k for k in load_model(config256, full).state_dict()} == \
        {k for k in load_model(config256, pruned, clip_checkpoint=clip).state_dict()}


@pytest.mark.parametrize("command", [["scripts/convert.py"], ["-m", "dynamicrafter", "convert"]],
                         ids=["script", "python-m"])
def test_entry_points(command, tmp_path) -> None:
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, *command, str(CKPT), str(tmp_path / "out.ckpt")], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == f"ERROR: The output {tmp_path / 'out.ckpt'} must be a .safetensors file."


def test_merge_puts_a_full_fine_tune_into_a_complete_checkpoint(tmp_path):
    """A full fine-tune's unet.safetensors (release names) over its base gives a checkpoint the pipeline loads."""
    from dynamicrafter.checkpoints import read_state_dict

    base = read_state_dict(DATA / "tiny256.ckpt")
    key = "model.diffusion_model.out.2.bias"
    tuned = {key: base[key].float() + 1.0}
    save_file(tuned, str(tmp_path / "unet.safetensors"))
    out = tmp_path / "tuned.safetensors"
    assert main([str(DATA / "tiny256.ckpt"), str(out), "--dtype", "float32", "--merge",
                         str(tmp_path / "unet.safetensors")]) == 0
    model = load_model(load_config(DATA / "tiny256.yaml"), out)
    assert torch.equal(model.unet.out[2].bias, tuned[key])
    save_file({"model.diffusion_model.nope.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="has 1 tensor\\(s\\) the checkpoint .* lacks, such as "
                                         "model.diffusion_model.nope.weight; is it for another model\\?"):
        convert(DATA / "tiny256.ckpt", tmp_path / "x.safetensors", merge=[tmp_path / "other.safetensors"])
