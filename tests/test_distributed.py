"""The rank layout from torchrun's variables: one definition (``Ranks.from_env``) for generation and training,
and one sentence naming the variable and its value when one is wrong.
"""

from __future__ import annotations

import logging

import pytest

from dynamicrafter import cli
from dynamicrafter.distributed import Ranks
from dynamicrafter.errors import UserError
from dynamicrafter.training.distributed import Dist

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
ADVICE = "torchrun sets these, so unset them when not running under torchrun."


def set_env(monkeypatch, **values: str) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("env, layout", [
    ({}, (0, 1, 0)),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, (0, 1, 0)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8, 1)),
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2, 1)),  # no LOCAL_RANK: the rank
])
def test_layouts(monkeypatch, env, layout):
    set_env(monkeypatch, **env)
    for kind in (Ranks, Dist):  # training's Dist parses with the same definition
        ranks = kind.from_env()
        assert type(ranks) is kind and (ranks.rank, ranks.world_size, ranks.local_rank) == layout


@pytest.mark.parametrize("env, message", [
    ({"RANK": "abc"}, "RANK='abc' is not a whole number"),
    ({"RANK": ""}, "RANK='' is not a whole number"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1.0"}, "LOCAL_RANK='1.0' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be at least 1"),
    ({"WORLD_SIZE": "-4"}, "WORLD_SIZE='-4' must be at least 1"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK='2' must be from 0 to 1 when WORLD_SIZE is 2"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' must be from 0 to 1 when WORLD_SIZE is 2"),
    ({"RANK": "3"}, "RANK='3' must be 0 when WORLD_SIZE is 1 (unset)"),
    ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be from 0 to 3 when WORLD_SIZE is 4"),
    ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "4"}, "LOCAL_RANK='4' must be from 0 to 3 when WORLD_SIZE is 4"),
])
def test_bad_variables_are_one_sentence(monkeypatch, env, message):
    set_env(monkeypatch, **env)
    for kind in (Ranks, Dist):
        with pytest.raises(UserError) as error:
            kind.from_env()
        assert str(error.value) == f"{message}; {ADVICE}"


def test_the_command_prints_one_error_line(monkeypatch, tmp_path, caplog):
    set_env(monkeypatch, RANK="abc")
    with caplog.at_level(logging.ERROR):
        assert cli.main(["256", "--image_path", str(tmp_path / "missing.png"), "--prompt_text", "a cat"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"RANK='abc' is not a whole number; {ADVICE}"]


def test_the_training_command_prints_one_error_line(monkeypatch, caplog):
    from dynamicrafter.training.cli import main as train_main

    set_env(monkeypatch, RANK="abc")
    with caplog.at_level(logging.ERROR):
        assert train_main(["examples/clips", "--device", "cpu"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"RANK='abc' is not a whole number; {ADVICE}"]
