"""Agent-shaped benchmark: direct, nginx and TokenTrail side by side under many multi-turn agents.

    python bench/agents.py                           # 64 agents x 30 turns (about 2 minutes)
    python bench/agents.py --turns-list 4,16,30      # + bytes per trajectory token at 4, 16, 30 turns
    python bench/agents.py --profile /tmp/agents-profile.txt   # + a py-spy pass: top costs per thread
    python bench/agents.py --quick                   # 8 agents x 6 turns (what the test runs)
    python bench/agents.py --token-in                # TokenTrail with TOKENTRAIL_TOKEN_IN=true
    python bench/agents.py --token-in-modes          # + token-in rendering the whole history, then
                                                     #   only the new messages, side by side

``bench/run.py`` measures independent calls; this measures what a rollout of agents sends:
``--agents`` concurrent agents (``bench/agent_load.py``), each a ``--turns``-turn chat that re-sends its
whole history (system prompt + task of ``--first-prompt-tokens``, then each reply as it came back and
a ``--tool-result-tokens`` tool result: 1,000 to ~15,000 tokens by turn 30), every call streamed with
``return_token_ids``, 200-token replies at ``--delay-ms`` 2 ms per token. The upstream is the fake vLLM
in agent mode (``bench/fake_vllm.py --agent-mode``: ChatML prompts tokenized deterministically, replies
a function of the messages, ``/tokenize``, token-in's ``kv_transfer_params.prompt_token_ids`` honoured).
As in ``run.py``, every proxy is pinned to ``--proxy-core`` and the fake and the agents to
``--other-core``, and the targets are measured one after another: the same minutes of the same machine.

Printed, one column per target: calls/s and the ratio to direct; first-token latency (request sent to
the first streamed token) p50/p99 and what the proxy adds to direct's; whole-call p50/p99; errors; the
proxy's CPU seconds per wall second (its core's busy share, ``/proc/<pid>/stat``, workers included)
and, for TokenTrail, the recording writer thread's part of it (the thread named ``tokentrail-writ`` in
``/proc/<pid>/task/*/comm``). Then TokenTrail's database: one row per answered call, every row ok, and
for a sample of calls the stored prompt IDs equal the ones the fake must have used (recomputed here
from the conversation); its size and bytes per trajectory token (per trajectory: the last call's
prompt tokens + every call's generated tokens; bytes: the SQLite file and its WAL after TokenTrail
stopped and checkpointed); ``tokentrail export --format parquet`` over it, in sequences/s and MB/s of
Parquet written; and how the calls' prompts relate to the previous call's (``llm_calls.drift``).

``--token-in-modes`` adds two TokenTrail passes after the others, each a fresh process on its own
database: token-in rendering the whole history for every continuing call
(``TOKENTRAIL_TOKEN_IN_STAND_IN=false``, what token-in did before) and token-in rendering only the new
messages after a stand-in history (the default), with their databases checked like the main one
(sampled prompt IDs equal the fake's); then the bytes sent to the fake's ``/tokenize`` per call at
turns 4, 16 and the last, in every TokenTrail pass (the fake counts them, ``GET /fake/tokenize-stats``).

``--turns-list`` runs TokenTrail alone once more per other turn count, each on its own database, for
bytes per trajectory token by conversation length. ``--profile`` runs one more TokenTrail pass under
py-spy (apart, so that sampling does not slow the measured pass) and prints the top costs of the
event loop and of the writer thread. Exits non-zero when a check fails or a call failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import fake_chat  # noqa: E402
import profiling  # noqa: E402
from agent_load import Shape, add_shape_options  # noqa: E402
from targets import (  # noqa: E402
    WRITER_THREAD_COMM,
    Targets,
    add_target_options,
    cpu_seconds,
    pinned,
    thread_cpu_seconds,
    wait_written,
)

QUICK = {"agents": 8, "turns": 6}
CHECK_SAMPLE = 64


@dataclass
class Pass:
    """One run of every agent against one target."""

    target: str
    load: dict[str, Any]
    cpu_s: float | None = None  # the proxy's CPU seconds during the pass (workers included)
    writer_cpu_s: float | None = None  # TokenTrail's writer thread's part of them

    def busy(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / self.load["seconds"]

    def writer_share(self) -> float | None:
        if self.writer_cpu_s is None or not self.cpu_s:
            return None
        return self.writer_cpu_s / self.cpu_s


def _run_agents(args: argparse.Namespace, url: str, turns: int, prefix: str) -> dict[str, Any]:
    command = [sys.executable, str(BENCH / "agent_load.py"), "--url", url, "--trajectory-prefix", prefix]
    command += ["--agents", str(args.agents), "--turns", str(turns), "--delay-ms", str(args.delay_ms)]
    command += ["--first-prompt-tokens", str(args.first_prompt_tokens)]
    command += [
        "--reply-tokens",
        str(args.reply_tokens),
        "--tool-result-tokens",
        str(args.tool_result_tokens),
    ]
    done = subprocess.run(pinned(args.other_core, command, args.no_pin), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"agent_load.py failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _measure(
    args: argparse.Namespace,
    name: str,
    url: str,
    pid: int,
    turns: int,
    recording: tuple[Path, Path] | None = None,
) -> Pass:
    """Every agent through ``url``, and the proxy's (``pid``'s) CPU time; for TokenTrail
    (``recording``: its database and spool folder) once every record is in the database."""
    before = cpu_seconds(pid) if pid else None
    writer_before = thread_cpu_seconds(pid, WRITER_THREAD_COMM) if recording else None
    load = _run_agents(args, url, turns, f"{name}-{turns}")
    if recording is not None:
        db_path, spool_dir = recording
        load["writer"] = wait_written(f"sqlite:///{db_path}", spool_dir, load["calls"])
    measured = Pass(name, load)
    if before is not None:
        measured.cpu_s = cpu_seconds(pid) - before
    writer_after = thread_cpu_seconds(pid, WRITER_THREAD_COMM) if recording else None
    if writer_before is not None and writer_after is not None:
        measured.writer_cpu_s = writer_after - writer_before
    print(f"  {name:<11}{turns:>3} turns {load['calls_per_s']:>8.1f} calls/s", file=sys.stderr)
    return measured


# ---- TokenTrail's database ----


def stored_prompt_ids(db: sqlite3.Connection, trajectory_id: str, seq: int) -> list[int] | None:
    """The prompt IDs TokenTrail stored for call ``seq`` of a trajectory, read as a user would.

    The one place that knows how prompts are stored: adapt it here when that changes."""
    row = db.execute(
        "SELECT prompt_token_ids FROM llm_calls WHERE trajectory_id = ? AND seq = ?", (trajectory_id, seq)
    ).fetchone()
    return None if row is None or row[0] is None else list(json.loads(row[0]))


def expected_prompts(shape: Shape, agent: int, wanted: set[int], token_in: bool) -> dict[int, list[int]]:
    """The prompt IDs the fake used for the turns ``wanted`` of ``agent``, recomputed from the
    conversation: the ChatML rendering of the messages, or with token-in the previous prompt, its
    sampled reply, the template's end of turn and the new message rendered (proxy/token_in/prompt.py)."""
    messages: list[dict[str, str]] = shape.first_messages(agent)
    prompts: dict[int, list[int]] = {}
    prompt: list[int] = []
    sampled: tuple[int, ...] = ()  # the previous reply's IDs
    for turn in range(max(wanted) + 1):
        if token_in and turn > 0:
            new = fake_chat.message_ids("user", messages[-1]["content"]) + fake_chat.GENERATION_PROMPT
            prompt = [*prompt, *sampled, *fake_chat.TEMPLATE_TAIL, *new]
        elif token_in or turn in wanted:
            prompt = fake_chat.render(messages, generation_prompt=True)
        if turn in wanted:
            prompts[turn] = prompt
        reply = fake_chat.reply(messages, shape.reply_tokens)
        sampled = reply.ids
        messages += [{"role": "assistant", "content": reply.text}, shape.tool_result(agent, turn)]
    return prompts


def check_records(
    db_path: Path, calls: int, prefix: str, shape: Shape, agents: int, turns: int, token_in: bool
) -> list[str]:
    """Problems in TokenTrail's database; one line saying what was checked when there are none."""
    problems = []
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT count(*) FROM llm_calls").fetchone()[0]
        if rows != calls:
            problems.append(f"{rows} call rows for {calls} calls answered")
        bad = db.execute(
            "SELECT count(*) FROM llm_calls WHERE outcome != 'ok' OR integrity != 'ok'"
        ).fetchone()[0]
        if bad:
            problems.append(f"{bad} rows not ok")
        pairs = [(a, t) for a in range(agents) for t in range(turns)]
        picked = random.Random(16).sample(pairs, min(CHECK_SAMPLE, len(pairs)))  # noqa: S311
        sample = sorted({(0, turns - 1), *picked})  # (the longest prompt, always)
        checked = 0
        for agent in sorted({a for a, _ in sample}):
            wanted = {t for a, t in sample if a == agent}
            for turn, expected in expected_prompts(shape, agent, wanted, token_in).items():
                stored = stored_prompt_ids(db, f"{prefix}-{agent}", turn)
                checked += 1
                if stored != expected:
                    problems.append(f"agent {agent} turn {turn}: stored prompt IDs differ from the fake's")
    finally:
        db.close()
    if problems:
        return problems
    return [f"{rows} rows for {calls} calls, all ok; {checked} sampled calls' prompt IDs equal the fake's"]


def _bytes_by_column(db: sqlite3.Connection, top: int = 4) -> list[tuple[str, int]]:
    """The columns whose values are longest in all (``length()``: bytes of text and blobs), most first;
    read from the schema, so that it follows changes to how calls are stored."""
    totals = []
    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    for (table,) in tables.fetchall():
        columns = [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
        sums = db.execute(
            "SELECT " + ", ".join(f'coalesce(sum(length("{c}")), 0)' for c in columns) + f' FROM "{table}"'
        ).fetchone()
        totals += [(f"{table}.{column}", int(n)) for column, n in zip(columns, sums, strict=True)]
    return sorted(totals, key=lambda item: -item[1])[:top]


def storage(db_path: Path) -> dict[str, Any]:
    """Size of the database (file + WAL, after a checkpoint) and its trajectory tokens."""
    db = sqlite3.connect(db_path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        trajectories, tokens = db.execute(
            "SELECT count(*), coalesce(sum(last.prompt_tokens + per.generated), 0) FROM "
            "(SELECT trajectory_id, max(seq) AS last_seq, sum(completion_tokens) AS generated "
            " FROM llm_calls GROUP BY trajectory_id) per "
            "JOIN llm_calls last ON last.trajectory_id = per.trajectory_id AND last.seq = per.last_seq"
        ).fetchone()
        calls = db.execute("SELECT count(*) FROM llm_calls").fetchone()[0]
        drift = dict(
            db.execute(
                "SELECT coalesce(drift, '-'), count(*) FROM llm_calls GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
        columns = _bytes_by_column(db)
        fallbacks = dict(
            db.execute(
                "SELECT token_in_fallback, count(*) FROM llm_calls "
                "WHERE token_in_fallback IS NOT NULL GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
    finally:
        db.close()
    wal = db_path.with_name(db_path.name + "-wal")
    size = db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    return {
        "bytes": size,
        "calls": calls,
        "trajectories": trajectories,
        "trajectory_tokens": tokens,
        "bytes_per_trajectory_token": size / tokens if tokens else None,
        "drift": drift,
        "token_in_fallback": fallbacks,
        "largest_columns": columns,
    }


def export_speed(args: argparse.Namespace, db_path: Path, out: Path) -> dict[str, Any]:
    """``tokentrail export --format parquet`` over the database, pinned to the proxy core."""
    script = Path(sys.executable).with_name("tokentrail")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "tokentrail.proxy.cli"]
    command = [*cli, "export", "--format", "parquet", "--out", str(out), "--db", f"sqlite:///{db_path}"]
    began = time.perf_counter()
    done = subprocess.run(pinned(args.proxy_core, command, args.no_pin), capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"tokentrail export failed:\n{done.stderr}")
    sequences = re.search(r"(\d+) sequences", done.stdout)
    tokens = re.search(r"(\d+) tokens \(", done.stdout)
    seconds = re.search(r"([\d.]+) s \(", done.stdout)
    return {
        "line": done.stdout.strip(),
        "sequences": int(sequences[1]) if sequences else None,
        "tokens": int(tokens[1]) if tokens else None,
        "seconds": float(seconds[1]) if seconds else wall,
        "wall_s": wall,
        "bytes": out.stat().st_size,
    }


# ---- the run ----


def _tokentrail_pass(
    args: argparse.Namespace, targets: Targets, turns: int, folder: Path
) -> tuple[Pass, dict[str, Any]]:
    """A fresh TokenTrail on its own database in ``folder``: one pass, then its storage figures."""
    folder.mkdir()
    db_path = folder / "tokentrail.db"
    url, process = targets.start_tokentrail(f"sqlite:///{db_path}", folder)
    try:
        measured = _measure(args, "tokentrail", url, process.pid, turns, (db_path, folder))
    finally:
        targets.stop_one(process)
    return measured, storage(db_path)


def _mode_passes(args: argparse.Namespace, passes: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(name, settings) of each TokenTrail pass ``--token-in-modes`` and ``--recorder-modes`` ask for,
    in their order; a mode given again gets a ' more."""
    wanted: list[tuple[str, dict[str, str]]] = []
    for mode in filter(None, args.token_in_modes.split(",")):
        if mode not in ("full", "stand-in"):
            raise SystemExit(f"--token-in-modes: {mode!r} is neither full nor stand-in")
        stand_in = "true" if mode == "stand-in" else "false"
        wanted.append(
            (f"ti-{mode}", {"TOKENTRAIL_TOKEN_IN": "true", "TOKENTRAIL_TOKEN_IN_STAND_IN": stand_in})
        )
    for mode in filter(None, args.recorder_modes.split(",")):
        if mode not in ("thread", "process"):
            raise SystemExit(f"--recorder-modes: {mode!r} is neither thread nor process")
        wanted.append((f"rec-{mode}", {"TOKENTRAIL_RECORDER": mode}))
    named = []
    taken = set(passes)
    for name, settings in wanted:
        while name in taken:
            name += "'"
        taken.add(name)
        named.append((name, settings))
    return named


def _profile_pass(args: argparse.Namespace, targets: Targets, folder: Path) -> list[profiling.ThreadCosts]:
    """A fresh TokenTrail under py-spy for one pass (not measured: sampling slows it)."""
    folder.mkdir()
    url, process = targets.start_tokentrail(f"sqlite:///{folder / 'tokentrail.db'}", folder)
    try:
        spy = profiling.record(process.pid, args.profile)
        if spy is None:
            return []
        try:
            _run_agents(args, url, args.turns, "profile")
            time.sleep(0.5)  # the writer's last batch
        finally:
            complaint = profiling.stop(spy)
    finally:
        targets.stop_one(process)
    if complaint or not args.profile.exists():
        print(f"py-spy: {complaint or 'no output'}", file=sys.stderr)
        return []
    return profiling.top_costs(args.profile)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_options(parser)
    parser.add_argument("--quick", action="store_true", help="8 agents x 6 turns (overrides both)")
    parser.add_argument(
        "--turns-list",
        default="",
        help="also bytes per trajectory token at these turn counts, e.g. 4,16,30 (TokenTrail alone, "
        "each on its own database; --turns is measured with the others)",
    )
    parser.add_argument("--token-in", action="store_true", help="TokenTrail with TOKENTRAIL_TOKEN_IN=true")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="one more TokenTrail pass under py-spy: its raw stacks here, the top costs printed",
    )
    parser.add_argument(
        "--token-in-modes",
        nargs="?",
        const="full,stand-in",
        default="",
        metavar="ORDER",
        help="after the targets, token-in rendering the whole history (full) and only the new messages "
        "(stand-in), in this order (default full,stand-in; a mode may come again: stand-in,full,stand-in)",
    )
    parser.add_argument(
        "--recorder-modes",
        default="",
        metavar="ORDER",
        help="after the targets, TokenTrail passes with the records written by a thread of the proxy "
        "(thread) and by the recorder process (process), in this order, e.g. thread,process,thread,process",
    )
    parser.add_argument("--json-out", type=Path, metavar="PATH", help="write every figure here as JSON")
    parser.add_argument("--keep-db", type=Path, metavar="PATH", help="copy TokenTrail's database here")
    add_target_options(parser, "direct,nginx,tokentrail")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.turns = QUICK["agents"], QUICK["turns"]
    shape = Shape(args.first_prompt_tokens, args.reply_tokens, args.tool_result_tokens)
    other_turns = sorted({int(t) for t in args.turns_list.split(",") if t.strip()} - {args.turns})
    figures: dict[str, Any] = {"load_average_before": os.getloadavg(), "passes": {}, "by_turns": {}}
    env = {"TOKENTRAIL_TOKEN_IN": "true"} if args.token_in else {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        targets = Targets(args, tmp, fake_options=["--agent-mode"], tokentrail_extra_env=env)
        targets.start()
        names = [t for t in args.targets.split(",") if t in targets.urls]
        passes: dict[str, Pass] = {}
        try:
            for name in names:
                recording = (tmp / "bench.db", tmp) if name == "tokentrail" else None
                pid = targets.pids.get(name, 0) if name != "direct" else 0
                _tokenize_stats(targets.upstream, reset=True)
                passes[name] = _measure(args, name, targets.urls[name], pid, args.turns, recording)
                if name == "tokentrail":
                    figures["tokenize"] = {name: _tokenize_stats(targets.upstream)}
            for name, settings in _mode_passes(args, passes):
                targets.tokentrail_extra_env = {**env, **settings}
                _tokenize_stats(targets.upstream, reset=True)
                passes[name], stored = _tokentrail_pass(args, targets, args.turns, tmp / name)
                figures.setdefault("tokenize", {})[name] = _tokenize_stats(targets.upstream)
                figures.setdefault("modes", {})[name] = stored
                figures["modes"][name]["check"] = check_records(
                    tmp / name / "tokentrail.db", passes[name].load["calls"], f"tokentrail-{args.turns}",
                    shape, args.agents, args.turns, "TOKENTRAIL_TOKEN_IN" in settings or args.token_in,
                )  # fmt: skip
                targets.tokentrail_extra_env = env
            if targets.tokentrail_process is not None:
                targets.stop_one(targets.tokentrail_process)  # SIGTERM: drains, checkpoints, closes
                db_path = tmp / "bench.db"
                figures["check"] = check_records(
                    db_path, passes["tokentrail"].load["calls"], f"tokentrail-{args.turns}", shape,
                    args.agents, args.turns, args.token_in,
                )  # fmt: skip
                figures["by_turns"][args.turns] = storage(db_path)
                if args.keep_db:
                    shutil.copyfile(db_path, args.keep_db)
                figures["export"] = export_speed(args, db_path, tmp / "export.parquet")
                for turns in other_turns:
                    _, figures["by_turns"][turns] = _tokentrail_pass(
                        args, targets, turns, tmp / f"turns-{turns}"
                    )
                if args.profile:
                    figures["profile"] = _profile_pass(args, targets, tmp / "profile")
        finally:
            targets.stop()
    figures["load_average_after"] = os.getloadavg()
    figures["passes"] = {
        name: {**p.load, "busy": p.busy(), "writer_share": p.writer_share()} for name, p in passes.items()
    }
    _print_report(args, shape, passes, figures)
    if args.json_out:
        profile = [c.as_dict() for c in figures.get("profile", [])]
        args.json_out.write_text(json.dumps({**figures, "profile": profile}, indent=1, default=str))
    failed = any(p.load["errors"] for p in passes.values())
    return 1 if failed or any("all ok" not in line for line in figures.get("check", [])) else 0


def _tokenize_stats(upstream: str, *, reset: bool = False) -> dict[str, Any]:
    """The fake vLLM's ``/tokenize`` counts (``bench/fake_vllm.py``: ``TokenizeStats``); ``reset``
    starts them again."""
    request = urllib.request.Request(  # noqa: S310 - the local fake
        upstream + "/fake/tokenize-stats", method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - the local fake
        stats: dict[str, Any] = json.loads(answer.read())
    return stats


def _print_tokenize(figures: dict[str, Any], turns: int) -> None:
    """``/tokenize`` bytes per call at a few turns, per TokenTrail pass."""
    wanted = sorted({t for t in (4, 16, turns) if t <= turns})
    names = list(figures.get("tokenize", {}))
    if not names:
        return
    print("\n/tokenize per call (bytes sent to the fake vLLM's /tokenize; requests) at turn:")
    print(f"{'':<24}" + "".join(f"{name:>16}" for name in names))
    for turn in wanted:
        cells = []
        for name in names:
            row = figures["tokenize"][name]["by_turn"].get(str(turn))
            cells.append("-" if not row or not row[0] else f"{row[2] / row[0]:,.0f} B; {row[1] / row[0]:.1f}")
        print(f"{f'  turn {turn}':<24}" + "".join(f"{c:>16}" for c in cells))
    totals = []
    for name in names:
        rows = figures["tokenize"][name]["by_turn"].values()
        calls = sum(r[0] for r in rows)
        totals.append(f"{sum(r[2] for r in rows) / max(1, calls):,.0f} B")
    print(f"{'  mean, every call':<24}" + "".join(f"{c:>16}" for c in totals))
    chat = []
    for name in names:
        rows = figures["tokenize"][name]["by_turn"].values()
        chat.append(f"{sum(r[3] for r in rows) / max(1, sum(r[0] for r in rows)):,.0f} B")
    print(f"{'  chat bodies rendered':<24}" + "".join(f"{c:>16}" for c in chat))
    for name, stored in figures.get("modes", {}).items():
        check = "; ".join(stored["check"])
        print(f"{name}: {check}; drift {stored['drift']}; fallbacks {stored['token_in_fallback']}")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _print_report(
    args: argparse.Namespace, shape: Shape, passes: dict[str, Pass], figures: dict[str, Any]
) -> None:
    last_prompt = len(expected_prompts(shape, 0, {args.turns - 1}, args.token_in)[args.turns - 1])
    before, after = figures["load_average_before"], figures["load_average_after"]
    print(
        f"\n{args.agents} agents x {args.turns} turns, streamed {args.reply_tokens}-token replies at "
        f"{args.delay_ms:g} ms/token, prompts {args.first_prompt_tokens:,} to {last_prompt:,} tokens"
        f"{', TokenTrail with token-in' if args.token_in else ''}; "
        + (
            f"proxies pinned to core {args.proxy_core}, fake vLLM and agents to core {args.other_core}"
            if not args.no_pin
            else "not pinned"
        )
        + f"; load average {before[0]:.2f} before, {after[0]:.2f} after"
    )
    direct = passes.get("direct")

    def added(p: Pass, key: str) -> float | None:
        if direct is None or p is direct or p.load[key] is None or direct.load[key] is None:
            return None
        return float(p.load[key] - direct.load[key])

    rows: list[tuple[str, Any]] = [
        ("calls/s", lambda p: _fmt(p.load["calls_per_s"])),
        (
            "x direct",
            lambda p: _fmt(p.load["calls_per_s"] / direct.load["calls_per_s"], ".3f") if direct else "-",
        ),
        ("first token p50 ms", lambda p: _fmt(p.load["ttft_p50_ms"], ".2f")),
        ("first token p99 ms", lambda p: _fmt(p.load["ttft_p99_ms"], ".2f")),
        ("  added p50 ms", lambda p: _fmt(added(p, "ttft_p50_ms"), "+.2f")),
        ("  added p99 ms", lambda p: _fmt(added(p, "ttft_p99_ms"), "+.2f")),
        ("call p50 ms", lambda p: _fmt(p.load["p50_ms"])),
        ("call p99 ms", lambda p: _fmt(p.load["p99_ms"])),
        ("errors", lambda p: str(p.load["errors"])),
        ("proxy core busy", lambda p: _fmt(p.busy(), ".1%")),
        ("  writer thread's part", lambda p: _fmt(p.writer_share(), ".1%")),
    ]
    print(f"{'':<24}" + "".join(f"{name:>12}" for name in passes))
    for label, cell in rows:
        print(f"{label:<24}" + "".join(f"{cell(p):>12}" for p in passes.values()))
    for p in passes.values():
        for sample in p.load["error_samples"]:
            print(f"  {p.target} error: {sample}")
    if "check" not in figures:
        return
    main_db = figures["by_turns"][args.turns]
    print(f"\nTokenTrail's database, check: {'; '.join(figures['check'])}")
    print(
        f"stored: {main_db['bytes'] / 2**20:.1f} MiB for {main_db['trajectories']} trajectories of "
        f"{main_db['trajectory_tokens']:,} trajectory tokens: "
        f"{main_db['bytes_per_trajectory_token']:.1f} bytes per trajectory token, "
        f"{main_db['bytes'] / max(1, main_db['calls']) / 1024:.1f} KiB per call"
    )
    print(
        "largest columns (bytes of their values): "
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in main_db["largest_columns"])
    )
    if len(figures["by_turns"]) > 1:
        print(
            "bytes per trajectory token by turns per agent: "
            + ", ".join(
                f"{turns}: {f['bytes_per_trajectory_token']:.1f} ({f['bytes'] / 2**20:.1f} MiB)"
                for turns, f in sorted(figures["by_turns"].items())
            )
        )
    export = figures["export"]
    megabytes = export["bytes"] / 1e6
    print(
        f"export (tokentrail export --format parquet): {export['sequences']} sequences, {megabytes:.1f} MB "
        f"in {export['seconds']:.1f} s: {_fmt(export['sequences'] / export['seconds'], '.0f')} sequences/s, "
        f"{megabytes / export['seconds']:.1f} MB/s, {_fmt(export['tokens'], ',')} tokens "
        f"({export['wall_s']:.1f} s with the CLI's start-up)"
    )
    print(f"prompts vs the previous call (llm_calls.drift): {main_db['drift']}")
    if main_db["token_in_fallback"]:
        print(f"token-in fallbacks: {main_db['token_in_fallback']}")
    _print_tokenize(figures, args.turns)
    if figures.get("profile"):
        profiling.print_top_costs(figures["profile"])


if __name__ == "__main__":
    sys.exit(main())
