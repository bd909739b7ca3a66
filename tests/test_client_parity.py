"""tokentrail.client against strands-vllm 0.0.6 itself: same names, parameters, defaults, messages."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from typing import Any

import pytest
import strands_vllm

import tokentrail.client as ours
from tokentrail.client import Token, TokenManager, VLLMModel, make_vllm_openai_model


def test_every_public_name_of_strands_vllm_is_exported() -> None:
    assert set(strands_vllm.__all__) <= set(ours.__all__)


def _parameters(obj: Any) -> list[inspect.Parameter]:
    return list(inspect.signature(obj).parameters.values())


@pytest.mark.parametrize(
    "name",
    [
        "VLLMModel",
        "make_vllm_openai_model",
        "VLLMTokenRecorder",
        "VLLMToolValidationHooks",
        "Token",
        "TokenManager",
    ],
)
def test_constructor_parameters_and_defaults_match(name: str) -> None:
    theirs = {p.name: p for p in _parameters(getattr(strands_vllm, name))}
    mine = {p.name: p for p in _parameters(getattr(ours, name))}
    for param_name, param in theirs.items():
        assert param_name in mine, f"{name} lacks parameter {param_name}"
        assert mine[param_name].kind == param.kind, f"{name}.{param_name} kind"
        assert mine[param_name].default == param.default, f"{name}.{param_name} default"
    extra = [p for n, p in mine.items() if n not in theirs]
    assert all(p.default is not inspect.Parameter.empty for p in extra), "added parameters must be optional"
    assert list(theirs) == [n for n in mine if n in theirs], "parameter order"


def test_config_keys_match() -> None:
    assert ours.VLLMModelConfig.__annotations__.keys() == strands_vllm.VLLMModelConfig.__annotations__.keys()


@pytest.mark.parametrize("name", ["VLLMToolValidationHooks", "Token"])
def test_dataclass_fields_and_repr_match(name: str) -> None:
    theirs, mine = getattr(strands_vllm, name), getattr(ours, name)
    assert [(f.name, f.default) for f in dataclasses.fields(theirs)] == [
        (f.name, f.default) for f in dataclasses.fields(mine)
    ]
    assert repr(theirs() if name != "Token" else theirs(5)) == repr(mine() if name != "Token" else mine(5))


def test_public_members_are_kept() -> None:
    pairs = [
        (strands_vllm.TokenManager, ours.TokenManager),
        (strands_vllm.VLLMTokenRecorder, ours.VLLMTokenRecorder),
        (strands_vllm.VLLMModel, ours.VLLMModel),
        (strands_vllm.VLLMToolValidationHooks, ours.VLLMToolValidationHooks),
    ]
    for theirs, mine in pairs:
        names = {n for n in vars(theirs) if not n.startswith("__")}
        assert names <= set(dir(mine)), f"{mine.__name__} lacks {names - set(dir(mine))}"
    recorder_theirs, recorder_mine = strands_vllm.VLLMTokenRecorder(), ours.VLLMTokenRecorder()
    assert set(vars(recorder_theirs)) <= set(vars(recorder_mine))


def test_token_manager_behaves_the_same() -> None:
    theirs, mine = strands_vllm.TokenManager(), TokenManager()
    for manager in (theirs, mine):
        manager.add_prompt([1, 2, 3], [-0.1, -0.2])
        manager.add_response([])
        manager.add_response([4, 5], [-0.5, -0.6])
        manager.add_prompt([6])
    assert repr(theirs) == repr(mine) == "TokenManager(segments=3, tokens=6, output_tokens=2)"
    for prop in ("token_ids", "loss_mask", "logprobs", "segment_info"):
        assert getattr(theirs, prop) == getattr(mine, prop), prop
    assert [[(t.token_id, t.logprob, t.loss_mask) for t in s] for s in theirs.segments] == [
        [(t.token_id, t.logprob, t.loss_mask) for t in s] for s in mine.segments
    ]
    assert len(theirs) == len(mine) == 6
    mine.reset()
    assert len(mine) == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        Token(1).token_id = 2  # type: ignore[misc]


def test_token_manager_add_turn_merges_calls_into_one_sequence() -> None:
    manager = TokenManager()
    assert manager.add_turn([1, 2, 3], [4, 5], [-0.4, -0.5])
    assert manager.add_turn([1, 2, 3, 4, 5, 6, 7], [8])
    assert manager.token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert manager.loss_mask == [0, 0, 0, 1, 1, 0, 0, 1]
    assert manager.logprobs == [None, None, None, -0.4, -0.5, None, None, None]
    assert not manager.add_turn([1, 2, 9], [10]), "a prompt that does not extend the sequence is refused"
    assert len(manager) == 8


def test_params_merge_like_strands_vllm() -> None:
    for factory in (make_vllm_openai_model, strands_vllm.make_vllm_openai_model):
        model = factory(
            base_url="http://x/v1", model_id="m", return_token_ids=True, params={"temperature": 0}
        )
        assert model.get_config()["model_id"] == "m"
        assert model.get_config()["params"] == {"temperature": 0, "extra_body": {"return_token_ids": True}}
    kept = VLLMModel(
        base_url="http://x/v1", model_id="m", return_token_ids=True, params={"extra_body": {"foo": 1}}
    )
    assert kept.get_config()["params"]["extra_body"] == {"foo": 1, "return_token_ids": True}
    assert isinstance(make_vllm_openai_model(base_url="http://x/v1", model_id="m"), VLLMModel)


def test_update_config_takes_return_token_ids_and_disable_tools() -> None:
    model = VLLMModel(base_url="http://x/v1", model_id="m")
    model.update_config(return_token_ids=True, disable_tools=True)
    assert model.get_config()["params"] == {"extra_body": {"return_token_ids": True}, "tool_choice": "none"}
    model.update_config(disable_tools=False)
    assert "tool_choice" not in model.get_config()["params"]


def test_client_does_not_import_the_proxy_or_server_libraries() -> None:
    code = (
        "import sys, tokentrail.client; "
        "server = ('fastapi', 'sqlmodel', 'sqlalchemy', 'uvicorn'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in server or m.startswith('tokentrail.proxy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
