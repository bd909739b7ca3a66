"""Two ``tokentrail serve`` replicas on one PostgreSQL, with token-in, turns sent as soon as the last
answer came: exact without sticky routing (a turn that cannot be built exactly falls back, with a
reason), and token-in on every turn behind the shipped nginx recipe (``deploy/replicas/nginx.conf``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.postgres import create_database
from tests.servers import free_socket, serve_in_thread
from tests.test_metrics import by_label, db_rows, scrape
from tests.test_serve import serve_process
from tests.test_token_in import USER, TokenInFake
from tokentrail.proxy.storage.migrate import upgrade_database

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "deploy" / "replicas" / "nginx.conf"
NGINX = Path("/usr/sbin/nginx")
CHAT = "/v1/chat/completions"
REPLY = {"role": "assistant", "content": "ok"}
TRAJECTORIES = 12  # behind a hash on random ports, 6 all landed on one replica 1 time in 32
TURNS = 5


@contextmanager
def _replicas(db_url: str) -> Iterator[tuple[TokenInFake, list[str]]]:
    fake = TokenInFake()
    with serve_in_thread(fake) as url, ExitStack() as stack:
        replicas = []
        for name in ("a", "b"):
            _process, proxy, _log = stack.enter_context(
                serve_process(url, db_url, TOKENTRAIL_TOKEN_IN="true", TOKENTRAIL_INSTANCE=f"replica-{name}")
            )
            replicas.append(proxy)
        yield fake, replicas


@contextmanager
def _sticky_nginx(replicas: list[str], tmp_path: Path) -> Iterator[str]:
    """nginx with the shipped recipe, its replicas and port swapped for the test's."""
    if not NGINX.exists():
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs nginx-light)")
        pytest.skip("nginx is not installed (apt install nginx-light)")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    servers = "".join(f"        server {url.removeprefix('http://')};\n" for url in replicas)
    conf = re.sub(r"(        server tokentrail-[ab]:8000;\n)+", servers, RECIPE.read_text())
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    temp = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    user = "user root; " if os.geteuid() == 0 else ""
    globals_ = f"{user}pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log warn; daemon off;"
    process = subprocess.Popen([str(NGINX), "-c", str(path), "-p", str(tmp_path), "-g", globals_])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not _answers(url):
            assert process.poll() is None, (tmp_path / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(30)


async def _conversations(route: Any) -> list[int]:
    """Every trajectory's turns, each sent the moment the last answer came, through ``route(t, turn)``."""
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(trajectory: int) -> list[int]:
            messages: list[dict[str, Any]] = [USER]
            statuses = []
            for turn in range(TURNS):
                response = await client.post(
                    route(trajectory, turn) + CHAT,
                    json={"model": "m", "messages": messages},
                    headers={"X-Trajectory-Id": f"conv-{trajectory}"},
                )
                statuses.append(response.status_code)
                messages = [*messages, REPLY, USER]
            return statuses

        return [
            s for statuses in await asyncio.gather(*(one(t) for t in range(TRAJECTORIES))) for s in statuses
        ]


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/tokentrail/health", timeout=5)
    except httpx.TransportError:
        return False
    return True


def _wait_calls(db_url: str, count: int) -> list[tuple[Any, ...]]:
    """(trajectory, seq, turn, drift, fallback) of every call, once ``count`` are recorded; the turn
    is read from the request (its number of messages), to check ``seq`` against it."""
    deadline = time.monotonic() + 60
    while True:
        rows = db_rows(
            db_url,
            "SELECT trajectory_id, seq, request, drift, token_in_fallback FROM llm_calls ORDER BY 1, 2",
        )
        if len(rows) >= count:
            break
        assert time.monotonic() < deadline, f"only {len(rows)} of {count} calls recorded"
        time.sleep(0.05)
    turns = []
    for trajectory, seq, request, drift, fallback in rows:
        messages = (json.loads(request) if isinstance(request, str) else request)["messages"]
        turns.append((trajectory, seq, (len(messages) - 1) // 2, drift, fallback))
    return turns


def _fallbacks(replicas: list[str]) -> dict[tuple[str, ...], float]:
    counted: dict[tuple[str, ...], float] = {}
    for replica in replicas:
        for reason, n in by_label(
            scrape(replica)[0], "tokentrail_token_in_fallbacks_total", "reason"
        ).items():
            counted[reason] = counted.get(reason, 0) + n
    return counted


def test_without_sticky_routing_every_call_is_exact_or_falls_back_with_a_reason(postgres_url: str) -> None:
    db_url = create_database(postgres_url)
    upgrade_database(db_url)
    with _replicas(db_url) as (_fake, replicas):
        statuses = asyncio.run(_conversations(lambda t, turn: replicas[(t + turn) % 2]))
        rows = _wait_calls(db_url, TRAJECTORIES * TURNS)
        counted = _fallbacks(replicas)
    assert statuses == [200] * TRAJECTORIES * TURNS
    for trajectory in range(TRAJECTORIES):
        mine = [r for r in rows if r[0] == f"conv-{trajectory}"]
        assert [r[1] for r in mine] == list(range(TURNS))  # gapless, whichever replica wrote it
        assert [r[2] for r in mine] == list(range(TURNS))  # every turn once, in arrival order
    for _trajectory, _seq, turn, drift, fallback in rows:
        if turn == 0:
            assert fallback == "first_call"
        else:  # exact (the writer checked the IDs extend the last call's), or sent as text with a reason
            assert (drift == "token_in") == (fallback is None), (drift, fallback)
            assert fallback != "first_call"
    reasons: dict[tuple[str, ...], float] = {}
    for *_rest, fallback in rows:
        if fallback is not None:
            reasons[(fallback,)] = reasons.get((fallback,), 0) + 1
    assert counted == reasons
    print(f"\nwithout sticky routing: fallbacks {reasons}")


def test_behind_the_sticky_recipe_every_turn_after_the_first_is_token_in(
    postgres_url: str, tmp_path: Path
) -> None:
    db_url = create_database(postgres_url)
    upgrade_database(db_url)
    with _replicas(db_url) as (_fake, replicas), _sticky_nginx(replicas, tmp_path) as balancer:
        statuses = asyncio.run(_conversations(lambda t, turn: balancer))
        rows = _wait_calls(db_url, TRAJECTORIES * TURNS)
        per_replica = [
            sum(by_label(scrape(r)[0], "tokentrail_calls_total", "outcome").values()) for r in replicas
        ]
    assert statuses == [200] * TRAJECTORIES * TURNS
    assert [r[2] for r in rows] == list(range(TURNS)) * TRAJECTORIES  # one replica each: seq = turn
    assert [(r[3], r[4]) for r in rows if r[2] > 0] == [("token_in", None)] * TRAJECTORIES * (TURNS - 1)
    assert all(per_replica), f"one replica took every trajectory ({per_replica}): the test proves little"
    assert sum(per_replica) == TRAJECTORIES * TURNS


def test_the_recipe_is_valid_nginx(tmp_path: Path) -> None:
    if not NGINX.exists():
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs nginx-light)")
        pytest.skip("nginx is not installed (apt install nginx-light)")
    conf = (
        RECIPE.read_text()
        .replace("tokentrail-a:8000", "127.0.0.1:1")
        .replace("tokentrail-b:8000", "127.0.0.1:2")
    )
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    globals_ = f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log warn;"
    result = subprocess.run(
        [str(NGINX), "-t", "-c", str(path), "-p", str(tmp_path), "-g", globals_],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_compose_replicas_profile_runs_the_recipe_over_its_replicas() -> None:
    """``docker compose --profile postgres --profile replicas up``: the balancer serves the recipe, whose
    servers are the profile's replicas, each with a metric-count name of its own."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [name for name, service in services.items() if "replicas" in service.get("profiles", [])]
    assert sorted(replicas) == ["balancer", "tokentrail-a", "tokentrail-b"]
    assert "./deploy/replicas/nginx.conf:/etc/nginx/nginx.conf:ro" in services["balancer"]["volumes"]
    servers = re.findall(r"^\s+server (\S+);", RECIPE.read_text(), re.MULTILINE)
    assert servers == ["tokentrail-a:8000", "tokentrail-b:8000"]
    instances = {services[n]["environment"]["TOKENTRAIL_INSTANCE"] for n in ("tokentrail-a", "tokentrail-b")}
    assert instances == {"tokentrail-a", "tokentrail-b"}
    assert all(
        "postgres" in services[n]["environment"]["TOKENTRAIL_DB"] for n in ("tokentrail-a", "tokentrail-b")
    )
