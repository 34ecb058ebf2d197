"""Several prompts over time (FreeNoise's multi-prompt mode): parsing, checks, interpolation and whole chains.

The references in ``tests/data/multiprompt.safetensors`` are what FreeNoise's own interpolation
and the original DynamiCrafter with a per-frame text context computed (see tests/data/README.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dynamicrafter.errors import UserError
from dynamicrafter.prompt_schedule import check_schedule, frame_keys, interpolate, parse_prompt

from .conftest import CHAIN_TOL, DATA, MODULE_TOL, load_tiny, reference_image, relative_error, tiny_pipeline

REFERENCE = DATA / "multiprompt.safetensors"


def _metadata(name: str) -> dict:
    with safe_open(str(REFERENCE), "pt") as f:
        return json.loads(f.metadata()[name])


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE))


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: tiny_pipeline(name, dtype="float32") for name in ("tiny256", "tiny512")}


@pytest.mark.parametrize("case", ["tiny256.f16", "tiny256.f7"])
def test_interpolation_matches_freenoise(reference, case):
    settings = _metadata("cases")[case]
    frames, keys = settings["frames"], settings["keys"]
    assert keys == [frames * 3 // 8, frames - frames * 3 // 8 - 1]  # FreeNoise's two-prompt layout
    ours = interpolate(reference["tiny256.keys"], keys, frames)
    assert ours.shape == reference[case].shape
    assert relative_error(ours, reference[case]) < MODULE_TOL


def test_interpolation_holds_outside_the_keys_and_is_linear_between_them():
    embeddings = torch.tensor([[[0.0]], [[4.0]], [[-2.0]]])
    frames = interpolate(embeddings, [1, 5, 8], 10).flatten().tolist()
    assert frames == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 2.0, 0.0, -2.0, -2.0]
    assert frame_keys([3], 3) == [(0, 0)] * 3


def test_text_form_is_parsed_and_other_prompts_are_unchanged():
    assert parse_prompt("0: a cat sits | 48: a cat jumps") == {0: "a cat sits", 48: "a cat jumps"}
    assert parse_prompt(" 10 :one|2:two ") == {10: "one", 2: "two"}
    for text in ("a cat sits", "0: a cat sits", "a cat | a dog", "ratio 16:9 | wide", ""):
        assert parse_prompt(text) == text
    with pytest.raises(UserError) as error:
        parse_prompt("0: a cat sits | a cat jumps")
    assert str(error.value) == ("Part 'a cat jumps' of the timed prompt '0: a cat sits | a cat jumps' is not "
                                "'<frame>: <prompt>'; write e.g. '0: a cat sits | 48: a cat jumps'.")
    with pytest.raises(UserError) as error:
        parse_prompt("0: a | 0: b")
    assert str(error.value) == "Frame 0 is given twice in the timed prompt '0: a | 0: b'."


def test_a_schedule_is_sorted_and_one_prompt_is_a_plain_prompt():
    assert list(check_schedule({9: "b", 0: "a"}, 10)) == [0, 9]
    assert check_schedule({4: "only"}, 10) == "only"


def test_the_unconditional_branch_keeps_the_negative_prompt_on_every_frame(pipes):
    pipe = pipes["tiny256"]
    request = pipe.check_inputs([reference_image(load_tiny("tiny256").vectors)] * 2,
                                [{0: "a", 3: "b"}, "c"], negative_prompt="blur", num_frames=5, height=64, width=64)
    branches, _ = pipe.encode(request)
    text = pipe.model.encode_text(["a", "b", "c", "blur"])
    assert branches.context.shape == (2, 5, 77 + 64, 16)
    torch.testing.assert_close(branches.context[0, :, :77], interpolate(text[:2], [0, 3], 5))
    torch.testing.assert_close(branches.context[1, :, :77], text[2:3].expand(5, -1, -1))
    image_tokens = branches.context[:, :1, 77:]
    assert torch.equal(branches.context[:, :, 77:], image_tokens.expand(-1, 5, -1, -1))  # the same on every frame
    assert branches.uncond_context.shape == (2, 77 + 64, 16)
    torch.testing.assert_close(branches.uncond_context[:, :77], text[3:].expand(2, -1, -1))


@pytest.mark.parametrize("name", ["tiny256", "tiny512"])
def test_chain_matches_the_original_with_per_frame_text(reference, pipes, name, monkeypatch):
    settings = _metadata("chains")[name]
    prompts = _metadata("prompts")
    pipe = pipes[name]
    image = reference_image(load_tiny(name).vectors)
    windows = {"window_size": settings["window_size"], "window_stride": settings["window_stride"],
               "noise_rescheduling": False} if settings["window_size"] else {}

    def run(prompt, **options):
        return pipe(image, prompt, num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                    eta=settings["eta"], frame_stride=settings["frame_stride"], num_frames=settings["frames"],
                    height=settings["height"], width=settings["width"], guidance_rescale=settings["guidance_rescale"],
                    timestep_spacing=settings["timestep_spacing"], latents=reference[f"{name}.chain.x_T"],
                    output_type="latent", return_dict=False, **windows, **options)

    keys = {int(frame): text for frame, text in settings["keys"].items()}
    assert list(keys.values()) == prompts
    expected = reference[f"{name}.chain.latents"]
    ours = run(keys)
    err = relative_error(ours, expected)
    print(f"\n{name}: relative error {err:.3g}, max abs {(ours - expected).abs().max():.3g}")
    assert err < CHAIN_TOL, f"{name} multi-prompt chain: relative error {err:.3g}"
    if name == "tiny512":  # the same with the text form, and sequential branches
        text = " | ".join(f"{frame}: {prompt}" for frame, prompt in keys.items())
        monkeypatch.setattr(pipe, "sequential_guidance", True)
        assert relative_error(run(parse_prompt(text)), expected) < CHAIN_TOL
        monkeypatch.undo()
    else:  # the first prompt alone differs (the tiny text encoder puts the two prompts close together)
        assert relative_error(run(prompts[0]), expected) > 5 * CHAIN_TOL
