"""Certificates: what produced each call's tokens, once per distinct value, in ``turns``, the API,
the export (``--certificate``) and on the real vLLM (model, tokenizer and vLLM version learned from it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from tests.conftest import Proxy, running_proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream
from tokentrail.proxy.recording.certificate import certify, sampling_of
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.storage.migrate import alembic_config, upgrade_database

CHAT = "/v1/chat/completions"
IDENTITY = {"model": "m", "model_root": "/m", "tokenizer": "t1", "template": "p1", "vllm_version": "0.32.0"}


def _record(
    request: dict[str, Any], identity: dict[str, Any] | None = IDENTITY, version: str | None = "v1"
) -> CallRecord:
    record = CallRecord("c", "t", CHAT, 0.0)
    record.request = {"model": "m", "messages": [{"role": "user", "content": "x"}], **request}
    record.upstream_identity = None if identity is None else dict(identity)
    record.weight_version = version
    return record


def test_a_certificate_changes_with_what_shapes_the_tokens_and_only_with_that() -> None:
    base = certify(_record({"temperature": 1.0, "top_p": 0.9}))
    # which sample, where it stops, what comes back, other messages: the same certificate
    same = certify(
        _record(
            {
                "temperature": 1.0,
                "top_p": 0.9,
                "seed": 7,
                "max_tokens": 9,
                "n": 2,
                "stream": True,
                "logprobs": True,
            },
        )
    )
    assert same.id == base.id
    assert certify(_record({"top_p": 0.9, "temperature": 1.0, "messages": []})).id == base.id  # key order
    changed = {
        "sampling": certify(_record({"temperature": 0.7, "top_p": 0.9})),
        "tools": certify(_record({"temperature": 1.0, "top_p": 0.9, "tools": [{"type": "function"}]})),
        "template": certify(_record({"temperature": 1.0, "top_p": 0.9, "chat_template": "{{ x }}"})),
        "kwargs": certify(
            _record({"temperature": 1.0, "top_p": 0.9, "chat_template_kwargs": {"enable_thinking": False}})
        ),
        "weights": certify(_record({"temperature": 1.0, "top_p": 0.9}, version="v2")),
        "tokenizer": certify(_record({"temperature": 1.0, "top_p": 0.9}, {**IDENTITY, "tokenizer": "t2"})),
        "default template": certify(
            _record({"temperature": 1.0, "top_p": 0.9}, {**IDENTITY, "template": "p2"})
        ),
        "vllm": certify(_record({"temperature": 1.0, "top_p": 0.9}, {**IDENTITY, "vllm_version": "0.33.0"})),
    }
    assert len({c.id for c in changed.values()} | {base.id}) == len(changed) + 1
    assert changed["tools"].sampling_digest == base.sampling_digest
    assert changed["tools"].template_hash != base.template_hash
    assert changed["sampling"].template_hash == base.template_hash
    assert sampling_of(_record({"temperature": 1.0, "top_p": 0.9, "seed": 1}).request or {}) == {
        "temperature": 1.0,
        "top_p": 0.9,
    }


def _certificates(proxy: Proxy) -> list[dict[str, Any]]:
    return proxy.rows("SELECT * FROM certificates ORDER BY first_seen_at")


def test_certificates_are_stored_once_per_distinct_value_and_every_call_refers_to_one(
    fake: tuple[FakeUpstream, str], tmp_path: Path, db_url: str
) -> None:
    with running_proxy(fake[1], tmp_path, db_url=db_url) as proxy:
        for trajectory in ("a", "b"):  # separate batches or not: one certificate for all six calls
            record_conversation(proxy.url, trajectory, ["one", "two", "three"])
            proxy.wait_all_records()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}
        response = httpx.post(proxy.url + CHAT, json=body, headers={"X-Trajectory-Id": "hot"}, timeout=30)
        assert response.status_code == 200
        proxy.wait_all_records()
        certificates = _certificates(proxy)
        assert len(certificates) == 2
        turns = proxy.rows("SELECT trajectory_id, certificate_id FROM turns ORDER BY trajectory_id, seq")
        by_trajectory: dict[str, set[str]] = {}
        for turn in turns:
            by_trajectory.setdefault(turn["trajectory_id"], set()).add(turn["certificate_id"])
        assert by_trajectory["a"] == by_trajectory["b"] != by_trajectory["hot"]
        assert {c["id"] for c in certificates} == set().union(*by_trajectory.values())
        hot = next(c for c in certificates if c["id"] in by_trajectory["hot"])
        sampling = hot["sampling"]
        assert (json.loads(sampling) if isinstance(sampling, str) else sampling) == {"temperature": 0.5}
        assert hot["model"] == "tiny"  # the fake is no vLLM: the request's model, nothing learned
        assert hot["vllm_version"] is None


def test_the_migration_adds_certificates_and_goes_back(db_url: str) -> None:
    upgrade_database(db_url)
    engine = create_engine(db_url)
    try:
        assert "certificate_id" in {c["name"] for c in inspect(engine).get_columns("llm_calls")}
        with engine.connect() as connection:
            connection.execute(text("SELECT certificate_id FROM turns")).all()
            connection.execute(text("SELECT id, template_hash, sampling FROM certificates")).all()
        config = alembic_config(db_url)
        command.downgrade(config, "0008_metric_counts")
        assert "certificate_id" not in {c["name"] for c in inspect(engine).get_columns("llm_calls")}
        assert not inspect(engine).has_table("certificates")
        with engine.connect() as connection:
            connection.execute(text("SELECT prompt_token_ids, weight_version FROM llm_calls")).all()
            connection.execute(text("SELECT weight_version FROM turns")).all()
        command.upgrade(config, "head")
    finally:
        engine.dispose()


# ---- on the real vLLM ----


@pytest.fixture
def vllm_proxy(vllm_url: str, tmp_path: Path) -> Iterator[Proxy]:
    with running_proxy(vllm_url, tmp_path, token_in=True) as proxy:
        identities = proxy.runtime.relay.context.identities
        assert identities is not None
        deadline = time.monotonic() + 60
        while identities.of(vllm_url, "tiny") is None:  # learned at start, in the background
            assert time.monotonic() < deadline, "the proxy did not learn the upstream's identity"
            time.sleep(0.05)
        yield proxy


@pytest.mark.vllm
def test_a_call_on_vllm_is_certified_with_what_vllm_says_it_serves_and_export_keeps_one_certificate(
    vllm_proxy: Proxy, vllm_url: str, tmp_path: Path
) -> None:
    proxy = vllm_proxy
    version = httpx.get(vllm_url + "/version", timeout=30).json()["version"]
    (card,) = httpx.get(vllm_url + "/v1/models", timeout=30).json()["data"]
    for trajectory, temperature in (("cool", 0.0), ("cool-2", 0.0), ("warm", 1.0)):
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Hi"}]
        for _ in range(2):
            body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": temperature}
            response = httpx.post(
                proxy.url + CHAT, json=body, headers={"X-Trajectory-Id": trajectory}, timeout=120
            )
            assert response.status_code == 200
            reply = response.json()["choices"][0]["message"]
            messages = [
                *messages,
                {"role": "assistant", "content": reply["content"]},
                {"role": "user", "content": "More"},
            ]
    proxy.wait_all_records()
    certificates = _certificates(proxy)
    assert len(certificates) == 2
    for certificate in certificates:
        assert certificate["model"] == "tiny"
        assert certificate["model_root"] == card["root"]
        assert certificate["vllm_version"] == version
        assert certificate["tokenizer"]
        assert certificate["template_hash"]
    calls = httpx.get(proxy.url + "/tokentrail/v1/trajectories/cool", timeout=30).json()["calls"]
    assert calls[0]["certificate"]["vllm_version"] == version
    assert calls[0]["certificate_id"] == calls[1]["certificate_id"] == calls[0]["certificate"]["id"]
    cool = calls[0]["certificate_id"]
    out = tmp_path / "cool.jsonl"
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrail.proxy.cli",
            "export",
            "--format",
            "jsonl",
            "--db",
            proxy.db_url,
            "--out",
            str(out),
            "--certificate",
            cool,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["trajectory_id"] for r in rows) == ["cool", "cool-2"]
    assert {r["certificate_id"] for r in rows} == {cool}
