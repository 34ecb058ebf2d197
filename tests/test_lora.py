"""Loading a LoRA (``dynamicrafter.lora``): what loads, the one-sentence refusal of every malformed file
or bad scale, a UNet left as it was by any failed load, and the permission bits of saved files.

The LoRAs are written here, two layers on the tiny 256 model (no training run needed).
"""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

from dynamicrafter import lora
from dynamicrafter.configs import load_config
from dynamicrafter.errors import UserError
from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

from .conftest import DATA, load_tiny

Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear(32 -> 32)
FF = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # Linear(128 -> 32)
FEATURES = {Q: (32, 32), FF: (128, 32)}
REDO = "train it again with `dynamicrafter train` or use an intact copy of"


def key(layer: str, side: str) -> str:
    return f"base_model.model.{layer}.lora_{side}.weight"


def tensors(ranks: tuple[int, int] = (4, 4)) -> dict[str, torch.Tensor]:
    """A LoRA of rank ``ranks[i]`` on the two layers, with non-zero B so that it changes the output."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for layer, rank in zip(FEATURES, ranks):
        features_in, features_out = FEATURES[layer]
        out[key(layer, "A")] = torch.randn(rank, features_in, generator=generator)
        out[key(layer, "B")] = torch.randn(features_out, rank, generator=generator) * 0.1
    return out


def write(folder: Path, weights: dict[str, torch.Tensor] | None = None, config: Any = None,
          header: dict[str, str] | None = None) -> Path:
    """A peft-style folder: the weights (``header`` as safetensors metadata) and ``config`` (JSON, or raw bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in (tensors() if weights is None else weights).items()}
    save_file(weights, str(folder / lora.WEIGHTS_NAME), metadata=header)
    if config is not None:
        text = config if isinstance(config, bytes) else json.dumps(config).encode()
        (folder / lora.CONFIG_NAME).write_bytes(text)
    return folder


@pytest.fixture(scope="module")
def pipe() -> DynamiCrafterImg2VideoPipeline:
    """A pipeline around a private copy of the tiny 256 model (loading a LoRA changes its UNet)."""
    return DynamiCrafterImg2VideoPipeline.from_model(copy.deepcopy(load_tiny("tiny256").model), "cpu", torch.float32)


@pytest.fixture
def unet(pipe):
    yield pipe.model.unet
    lora.unload_lora(pipe.model.unet)


def snapshot(unet) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], list[dict]]:
    """What a load may change: the module tree, the LoRA weights and every LoRA layer's scaling."""
    tree = [(name, type(m).__name__) for name, m in unet.named_modules()]
    weights = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" in n}
    scalings = [dict(m.scaling) for m in unet.modules() if hasattr(m, "scaling")]
    return tree, weights, scalings


def assert_same(before, after) -> None:
    assert before[0] == after[0] and before[2] == after[2]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_a_peft_folder_loads_with_its_settings_and_unloads(unet, pipe, tmp_path):
    base = snapshot(unet)
    assert lora.load_lora(unet, write(tmp_path / "a", config={"r": 4, "lora_alpha": 8}), pipe.config, 0.5) == 2
    layer = unet.get_submodule(Q)
    assert layer.r == {"default": 4} and layer.scaling == {"default": 0.5 * 8 / 4}
    assert torch.equal(layer.lora_A["default"].weight, tensors()[key(Q, "A")])
    assert lora.unload_lora(unet) == 2
    assert_same(base, snapshot(unet))
    # No lora_alpha: a scale of 1 (alpha = rank); no config at all: the rank from the weights.
    lora.load_lora(unet, write(tmp_path / "b", config={"r": 4}), pipe.config)
    assert unet.get_submodule(FF).scaling == {"default": 1.0}
    lora.load_lora(unet, write(tmp_path / "c"), pipe.config)
    assert unet.get_submodule(FF).r == {"default": 4}
    # A byte-order mark (Windows editors write one) is not an error.
    lora.load_lora(unet, write(tmp_path / "d", config=b"\xef\xbb\xbf" + json.dumps({"r": 4}).encode()), pipe.config)


def _without(name: str) -> Callable[[dict], None]:
    return lambda weights: weights.pop(name)


def _replace(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda weights: weights.update({name: value(weights[name])})


def _rename(old: str, new: str) -> Callable[[dict], None]:
    return lambda weights: weights.update({new: weights.pop(old)})


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor[0, 0] = value
        return tensor
    return poisoned


def _also(layer: str, features_in: int, features_out: int) -> Callable[[dict], None]:
    return lambda weights: weights.update({key(layer, "A"): torch.zeros(4, features_in),
                                           key(layer, "B"): torch.zeros(features_out, 4)})


DAMAGED = "LoRA {file} is damaged: "
NOT_PEFT = "is not peft's base_model.model.<module>.lora_A.weight or .lora_B.weight"
NOT_FLOAT = "values, where floating-point weights are expected"
FITS = "LoRA {path} does not fit the tiny256 model: "
BAD_WEIGHTS = [
    pytest.param(_replace(key(Q, "A"), lambda t: t[0]),
                 DAMAGED + f"{key(Q, 'A')} has shape (32,), where a matrix is expected", id="1-D"),
    pytest.param(_replace(key(Q, "B"), lambda t: t[None]),
                 DAMAGED + f"{key(Q, 'B')} has shape (1, 32, 4), where a matrix is expected", id="3-D"),
    pytest.param(_replace(key(Q, "A"), lambda t: t.to(torch.int64)),
                 DAMAGED + f"{key(Q, 'A')} holds int64 {NOT_FLOAT}", id="int64"),
    pytest.param(_replace(key(FF, "B"), lambda t: t > 0), DAMAGED + f"{key(FF, 'B')} holds bool {NOT_FLOAT}", id="bool"),
    pytest.param(_replace(key(Q, "A"), _poison(float("nan"))),
                 DAMAGED + f"{key(Q, 'A')} holds NaN or infinite values", id="nan"),
    pytest.param(_replace(key(FF, "B"), lambda t: _poison(float("-inf"))(t).half()),
                 DAMAGED + f"{key(FF, 'B')} holds NaN or infinite values", id="inf-float16"),
    pytest.param(_without(key(Q, "B")), DAMAGED + f"{Q} has a lora_A but no lora_B", id="no-B"),
    pytest.param(_without(key(FF, "A")), DAMAGED + f"{FF} has a lora_B but no lora_A", id="no-A"),
    pytest.param(_replace(key(Q, "B"), lambda t: torch.zeros(32, 8)),
                 DAMAGED + f"{Q}'s lora_A has rank 4 but its lora_B rank 8", id="A-B-ranks"),
    pytest.param(_rename(key(Q, "A"), f"{Q}.lora_A.weight"),
                 DAMAGED + f"its key {Q}.lora_A.weight {NOT_PEFT}", id="no-prefix"),
    pytest.param(_rename(key(Q, "A"), f"base_model.model.{Q}.lora_A.default.weight"),
                 DAMAGED + f"its key base_model.model.{Q}.lora_A.default.weight {NOT_PEFT}", id="adapter-name"),
    pytest.param(lambda weights: weights.update({f"base_model.model.{Q}.lora_B.bias": torch.zeros(32)}),
                 DAMAGED + f"its key base_model.model.{Q}.lora_B.bias {NOT_PEFT}", id="bias"),
    pytest.param(_also("input_blocks.9.attn1.to_q", 32, 32),
                 FITS + "it adapts input_blocks.9.attn1.to_q, which this UNet does not have.", id="no-such-layer"),
    pytest.param(_also("input_blocks.1.1", 32, 32),
                 FITS + "it adapts input_blocks.1.1, which is not a linear layer of this UNet.", id="not-linear"),
    pytest.param(_replace(key(FF, "A"), lambda t: t[:, :64]),
                 FITS + f"{FF} has 128 input features, the LoRA 64.", id="in-features"),
    pytest.param(_replace(key(FF, "B"), lambda t: torch.cat([t, t])),
                 FITS + f"{FF} has 32 output features, the LoRA 64.", id="out-features"),
]


@pytest.mark.parametrize("change, message", BAD_WEIGHTS)
def test_malformed_weights_are_one_sentence(unet, pipe, tmp_path, change, message):
    weights = tensors()
    change(weights)
    folder = write(tmp_path / "lora", weights, config={"r": 4, "lora_alpha": 4})
    file = folder / lora.WEIGHTS_NAME
    before = snapshot(unet)
    with pytest.raises(UserError) as error:
        pipe.load_lora_weights(folder)
    suffix = f"; {REDO} adapter_model.safetensors." if message.startswith(DAMAGED) else ""
    assert str(error.value) == message.format(file=file, path=folder) + suffix
    assert_same(before, snapshot(unet))


@pytest.mark.parametrize("config, header, message", [
    ({"r": 4}, None, "{file} is inconsistent: " + FF + " has rank 8 but adapter_config.json gives r=4"),
    (None, {"lora_rank": "4"}, "{file} is inconsistent: " + FF + " has rank 8 but its header gives lora_rank=4"),
    (None, None, "{file} is inconsistent: " + FF + " has rank 8 but " + Q + " has rank 4"),
], ids=["config-r", "header-rank", "unrecorded"])
def test_layers_of_different_ranks_are_refused(unet, pipe, tmp_path, config, header, message):
    folder = write(tmp_path / "lora", tensors(ranks=(4, 8)), config=config, header=header)
    before = snapshot(unet)
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, folder, pipe.config)
    file = folder / lora.WEIGHTS_NAME
    assert str(error.value) == (f"LoRA {message.format(file=file)}, and this loader takes one rank for every "
                                f"layer; {REDO} adapter_model.safetensors.")
    assert_same(before, snapshot(unet))


CONFIG_REDO = f"; {REDO} adapter_config.json."
BAD_CONFIGS = [
    ([4, 8], "holds a list, not a JSON object of LoRA settings" + CONFIG_REDO),
    (4, "holds a number, not a JSON object of LoRA settings" + CONFIG_REDO),
    ("r=4", "holds a string, not a JSON object of LoRA settings" + CONFIG_REDO),
    (None, "holds null, not a JSON object of LoRA settings" + CONFIG_REDO),
    (b'{"r": 4,}', "is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 9)"
                   + CONFIG_REDO),
    (b"", "is not valid JSON (Expecting value at line 1 column 1)" + CONFIG_REDO),
    (b'{"r": 4, "lora_alpha": "\xe9"}', "is not UTF-8 text" + CONFIG_REDO),
    ({"use_dora": True, "rank_pattern": {"x": 8}, "use_rslora": False},
     "uses peft's use_dora, rank_pattern, which dynamicrafter does not load; train a plain LoRA with "
     "`dynamicrafter train`."),
]


@pytest.mark.parametrize("config, problem", BAD_CONFIGS,
                         ids=["list", "number", "string", "null", "bad-json", "empty", "not-utf8", "dora"])
def test_an_adapter_config_that_is_not_a_json_object_of_settings(unet, pipe, tmp_path, config, problem):
    folder = write(tmp_path / "lora", config=config if isinstance(config, bytes) else json.dumps(config).encode())
    before = snapshot(unet)
    with pytest.raises(UserError) as error:
        pipe.load_lora_weights(folder)
    assert str(error.value) == f"LoRA config {folder / lora.CONFIG_NAME} {problem}"
    assert_same(before, snapshot(unet))


@pytest.mark.parametrize("config, header, problem", [
    ({"r": "four"}, None, "r must be a whole number, got str 'four'"),
    ({"r": 0}, None, "r must be at least 1, got 0"),
    ({"r": 4.5}, None, "r must be a whole number, got 4.5"),
    ({"r": True}, None, "r must be a whole number, got bool True"),
    ({"r": 4, "lora_alpha": None}, None, "lora_alpha must be a number, got NoneType None"),
    ({"r": 4, "lora_alpha": float("nan")}, None, "lora_alpha must be a finite number, got nan"),
    (None, {"lora_rank": "sixty-four"}, "the header's lora_rank must be a whole number, got str 'sixty-four'"),
    (None, {"lora_rank": "4", "lora_alpha": "inf"}, "the header's lora_alpha must be a finite number, got inf"),
], ids=["r-text", "r-0", "r-4.5", "r-true", "alpha-null", "alpha-nan", "header-rank-text", "header-alpha-inf"])
def test_bad_rank_or_alpha_settings(unet, pipe, tmp_path, config, header, problem):
    folder = write(tmp_path / "lora", config=config, header=header)
    where = folder / (lora.CONFIG_NAME if config else lora.WEIGHTS_NAME)
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, folder, pipe.config)
    what = "LoRA config" if config else "LoRA"
    assert str(error.value) == f"{what} {where} is damaged: {problem}; {REDO} {where.name}."
    assert not any(".lora_" in name for name, _ in unet.named_parameters())


def test_an_unreadable_adapter_config(unet, pipe, tmp_path):
    folder = write(tmp_path / "lora")
    (folder / lora.CONFIG_NAME).mkdir()
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, folder, pipe.config)
    assert str(error.value) == f"LoRA config {folder / lora.CONFIG_NAME} cannot be read (Is a directory)."


@pytest.mark.parametrize("scale, message", [
    (float("nan"), "scale must be a finite number, got nan."),
    (float("inf"), "scale must be a finite number, got inf."),
    (-1e9, "scale must be between 0 and 10, got -1000000000."),
    (10.5, "scale must be between 0 and 10, got 10.5."),
    ("1", "scale must be a number, got str '1'."),
    (None, "scale must be a number, got NoneType None."),
    (True, "scale must be a number, got bool True."),
], ids=["nan", "inf", "-1e9", "10.5", "text", "None", "True"])
def test_the_scale_is_checked_before_anything_else(unet, pipe, tmp_path, scale, message):
    folder = write(tmp_path / "lora")
    for path in (folder, tmp_path / "missing"):  # the scale first: not "does not exist"
        with pytest.raises(UserError) as error:
            pipe.load_lora_weights(path, scale=scale)
        assert str(error.value) == message
    assert not any(".lora_" in name for name, _ in unet.named_parameters())
    lora.load_lora(unet, folder, pipe.config, scale=1)
    with pytest.raises(UserError) as error:
        lora.set_lora_scale(unet, scale)
    assert str(error.value) == message and unet.get_submodule(Q).scaling == {"default": 1.0}


def test_a_failed_load_leaves_the_loaded_lora_as_it_was(unet, pipe, tmp_path):
    lora.load_lora(unet, write(tmp_path / "good", config={"r": 4, "lora_alpha": 4}), pipe.config, scale=0.5)
    before = snapshot(unet)
    weights = tensors(ranks=(4, 8))
    bad = write(tmp_path / "bad", weights, config={"r": 4})
    for path, scale in ((bad, 1.0), (tmp_path / "good", float("nan")), (tmp_path / "missing", 1.0)):
        with pytest.raises(UserError):
            lora.load_lora(unet, path, pipe.config, scale)
        assert_same(before, snapshot(unet))
    # A good one replaces it (the old layers do not linger beside the new).
    weights = {k: v for k, v in tensors().items() if FF not in k}
    assert lora.load_lora(unet, write(tmp_path / "q", weights), pipe.config) == 1
    assert not hasattr(unet.get_submodule(FF), "lora_A") and unet.get_submodule(Q).scaling == {"default": 1.0}


def test_an_interrupted_load_leaves_no_lora(unet, pipe, tmp_path, monkeypatch):
    import peft

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peft, "set_peft_model_state_dict", interrupted)  # after the LoRA layers are added
    before = snapshot(unet)
    with pytest.raises(KeyboardInterrupt):
        lora.load_lora(unet, write(tmp_path / "lora"), pipe.config)
    assert_same(before, snapshot(unet))


def _saved(folder: Path, model_config) -> Path:
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "ff.net.2"])
    return lora.save_lora(folder, tensors(), config, model_config)


def test_a_lora_of_another_model_or_no_lora_at_all(unet, pipe, tmp_path):
    folder = _saved(tmp_path / "lora", pipe.config)
    other = load_config(DATA / "tiny512.yaml")
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, folder, other)
    assert str(error.value) == (f"LoRA {folder} was trained on the tiny256 model (256x256, eps), "
                                "but this pipeline runs the tiny512 model (320x512, v).")
    assert not any(".lora_" in name for name, _ in unet.named_parameters())
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, tmp_path / "missing", pipe.config)
    assert str(error.value) == f"LoRA {tmp_path / 'missing'} does not exist."
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, tmp_path, pipe.config)
    assert str(error.value) == f"LoRA {tmp_path} does not exist (no adapter_model.safetensors in it)."
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"^\S+junk.safetensors is not a readable LoRA file \(.+\)\.$"):
        lora.load_lora(unet, tmp_path / "junk.safetensors", pipe.config)
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as error:
        lora.load_lora(unet, tmp_path / "model.safetensors", pipe.config)
    assert str(error.value) == (f"{tmp_path / 'model.safetensors'} holds no LoRA weights "
                                "(expected peft's lora_A / lora_B keys).")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_lora_files_have_the_umasks_mode(unet, pipe, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        folder = _saved(tmp_path / "lora", pipe.config)
    finally:
        os.umask(old)
    assert sorted(p.name for p in folder.iterdir()) == [lora.CONFIG_NAME, lora.WEIGHTS_NAME]  # no temporary left
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        lora.CONFIG_NAME: mode, lora.WEIGHTS_NAME: mode}
    assert lora.load_lora(unet, folder, pipe.config) == 2  # and it loads back
    assert unet.get_submodule(FF).r == {"default": 4}


def test_what_training_saves_loads_back(unet, pipe, tmp_path):
    """The keys, shapes and settings of add_lora / lora_state_dict / save_lora pass every check."""
    config = lora.add_lora(unet, rank=2, alpha=6, targets=("attn1.to_q",))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.fill_(0.01)
    state = lora.lora_state_dict(unet)
    lora.unload_lora(unet)
    folder = lora.save_lora(tmp_path / "lora", state, config, pipe.config)
    weights, meta = lora.read_lora(folder)
    assert weights.keys() == state.keys() and (meta["lora_rank"], meta["lora_alpha"]) == ("2", "6.0")
    assert lora.load_lora(unet, folder, pipe.config, scale=0.25) == len(state) // 2
    assert unet.get_submodule(Q).scaling == {"default": 0.25 * 6 / 2}
    assert torch.equal(unet.get_submodule(Q).lora_B["default"].weight, torch.full((32, 2), 0.01))
