"""The ``tokentrail`` command: ``serve``, ``db upgrade``, ``sql``. Thin: it parses and calls modules.

Every ``serve`` option also comes from a ``TOKENTRAIL_*`` environment variable; an option given on
the command line wins.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tokentrail.proxy import __version__
from tokentrail.proxy.errors import DatabaseTooNewError
from tokentrail.proxy.recording.spool import SpoolClaim, SpoolInUseError
from tokentrail.proxy.server.workers import (
    Supervisor,
    WorkersError,
    die_with_supervisor,
    listening_socket,
    spool_of,
    stranded_spools,
)
from tokentrail.proxy.settings import DEFAULT_DB, Settings

logger = logging.getLogger("tokentrail")

_CELL_WIDTH = 80
# Command-line options that override the TOKENTRAIL_* variable of the same name.
_SETTING_OPTIONS = ("upstream", "db", "host", "port", "workers", "token_in")


def _settings_help() -> str:
    lines = ["environment variables (an option given above wins):"]
    for name, field in Settings.model_fields.items():
        default = field.default
        lines.append(f"  TOKENTRAIL_{name.upper():<26} {field.description} [default: {default}]")
    return "\n".join(lines)


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help=f"database URL [TOKENTRAIL_DB, default {DEFAULT_DB}]")


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    """Which trajectories become sequences, and how (``export`` and ``verify --db``)."""
    parser.add_argument("--since", help="only trajectories created at or after this ISO time")
    parser.add_argument("--until", help="only trajectories created before this ISO time")
    parser.add_argument("--tag", action="append", default=[], help="key=value; repeat for several")
    parser.add_argument("--finished", action="store_true", help="only trajectories marked finished")
    parser.add_argument(
        "--mode",
        choices=["merged", "per_call", "last_turn"],
        default="merged",
        help="merged: one sequence per chain of calls whose prompts extend each other (default); "
        "per_call: one per call and choice; last_turn: only each trajectory's last call",
    )
    parser.add_argument("--batch", type=int, default=500, help="trajectories read per batch (memory bound)")
    parser.add_argument(
        "--by-group",
        action="store_true",
        help="only trajectories in a GRPO group (X-Trajectory-Group), each group's sequences together, "
        "with the group's normalised advantage",
    )
    parser.add_argument(
        "--min-weight-version", help="leave out sequences with tokens from an older policy version than this"
    )
    parser.add_argument(
        "--max-staleness",
        type=int,
        help="leave out sequences more than N policy versions behind the newest one seen",
    )
    parser.add_argument(
        "--certificate",
        help="keep only sequences whose every call was made under this certificate "
        "(llm_calls.certificate_id: template, tools, model, tokenizer, vLLM version, sampling, weights)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokentrail",
        description="A transparent recording proxy for vLLM that keeps the exact tokens of every call.",
    )
    parser.add_argument("--version", action="version", version=f"tokentrail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy in front of a vLLM server",
        description="Run the proxy. Migrates a new database first; refuses one from a newer version.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--upstream",
        action="append",
        help="vLLM base URL, e.g. http://127.0.0.1:8001; repeat for several "
        "[TOKENTRAIL_UPSTREAM, comma-separated]",
    )
    _add_db_option(serve)
    serve.add_argument("--host", help="listen address [TOKENTRAIL_HOST, default 127.0.0.1]")
    serve.add_argument("--port", type=int, help="listen port [TOKENTRAIL_PORT, default 8000]")
    serve.add_argument(
        "--workers",
        type=int,
        help="proxy processes on the port, one core each [TOKENTRAIL_WORKERS, default 1]",
    )
    serve.add_argument(
        "--token-in",
        action="store_true",
        default=None,
        help="send continuing chat calls with their trajectory's exact token IDs [TOKENTRAIL_TOKEN_IN]",
    )
    serve.add_argument("--worker-slot", type=int, help=argparse.SUPPRESS)  # both set by the supervisor
    serve.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--fleet-socket", type=Path, help=argparse.SUPPRESS)
    serve.add_argument("--recorder-socket", type=Path, help=argparse.SUPPRESS)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the newest schema")
    _add_db_option(upgrade)
    vacuum = db_commands.add_parser(
        "vacuum",
        help="give the space of converted rows back to the file system (stop TokenTrail first; on "
        "PostgreSQL this is VACUUM FULL of the whole database, which locks its tables while it runs)",
    )
    _add_db_option(vacuum)
    prune = db_commands.add_parser(
        "prune",
        help="delete whole trajectories (a dry run unless --yes)",
        description=(
            "Delete the trajectories that match every condition given, whole: their calls (those made "
            "after --before too) and completions go with them. Without --yes, print what would be "
            "deleted. Runs in short batches beside a running proxy; the space is reused by new records "
            "(`tokentrail db vacuum` gives it back to the file system)."
        ),
        epilog=(
            "example: tokentrail export --format parquet --out-dir archive/ --split day --finished "
            "--mark-exported && tokentrail db prune --exported --yes"
        ),
    )
    prune.add_argument("--before", help="only trajectories created (first call) before this ISO time")
    prune.add_argument("--tag", action="append", default=[], help="key=value; repeat for several")
    finished = prune.add_mutually_exclusive_group()
    finished.add_argument("--finished", action="store_true", help="only trajectories marked finished")
    finished.add_argument("--unfinished", action="store_true", help="only trajectories not marked finished")
    prune.add_argument(
        "--exported",
        action="store_true",
        help="only trajectories written by `export --mark-exported` and unchanged since",
    )
    prune.add_argument("--ids", help="only the trajectory ids in this file, one a line ('-': stdin)")
    prune.add_argument("--batch", type=int, help="trajectories deleted per transaction (default 50)")
    prune.add_argument("--yes", action="store_true", help="delete them (without it: a dry run)")
    _add_db_option(prune)

    sql = commands.add_parser(
        "sql",
        help="run one SQL statement and print the rows",
        description="Run one SQL statement against the database and print the result.",
        epilog='example: tokentrail sql "SELECT outcome, count(*) FROM llm_calls GROUP BY outcome"',
    )
    sql.add_argument("query", help="the SQL statement")
    _add_db_option(sql)
    fmt = sql.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON array of objects")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")

    reward = commands.add_parser(
        "reward",
        help="attach a reward to a trajectory",
        description="Set a trajectory's reward (a finite number) and metadata, straight in the database.",
    )
    reward.add_argument("trajectory_id")
    reward.add_argument("value", type=float, help="the reward, a finite number")
    reward.add_argument(
        "--metadata", help='a JSON object merged into the trajectory metadata, e.g. \'{"judge": "v2"}\''
    )
    reward.add_argument("--finish", action="store_true", help="also mark the trajectory finished")
    _add_db_option(reward)

    export = commands.add_parser(
        "export",
        help="write trajectories as token-exact training sequences (JSONL or Parquet)",
        description=(
            "Stream trajectories out of the database in batches and write their training sequences: "
            "input_ids, loss_mask (1 on generated tokens), logprobs, reward. Parquet needs the export extra."
        ),
    )
    export.add_argument("--format", choices=["jsonl", "parquet"], required=True)
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="the file to write")
    where.add_argument(
        "--out-dir",
        help="a folder, or a URL pyarrow opens (s3://bucket/path, gs://..., file://...), to write one "
        "file per --split value into: <dir>/day=2026-12-07/part-<run>.<format>; never replaces a file",
    )
    export.add_argument(
        "--split",
        default="day",
        help="with --out-dir: day (the trajectory's first call, UTC) or tag:<key> (default day)",
    )
    export.add_argument(
        "--mark-exported",
        action="store_true",
        help="once written, mark the trajectories exported, for `db prune --exported` (those that "
        "changed while the export ran are not marked)",
    )
    _add_selection_options(export)
    _add_db_option(export)

    verify = commands.add_parser(
        "verify",
        help="score exported sequences with the policy model and compare with vLLM's recorded logprobs",
        description=(
            "Score each exported sequence with a Hugging Face causal LM (the policy, on CPU or GPU) and "
            "compare the logprob of every token the loss mask marks with the logprob vLLM sampled it "
            "with. Reads a JSONL or Parquet file from `tokentrail export`, or, without FILE, the "
            "database with export's selection options. Exit 0: every compared token within the "
            "tolerance (or --max-over); 1: not; 2: the input or model cannot be verified. Needs the "
            "verify extra: pip install 'tokentrail[verify]'."
        ),
    )
    verify.add_argument("file", nargs="?", help="a JSONL or Parquet file written by `tokentrail export`")
    verify.add_argument("--model", required=True, help="the Hugging Face model folder (weights, config)")
    verify.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="largest |model logprob - recorded logprob| a token may have (default 0.05)",
    )
    verify.add_argument(
        "--max-over",
        type=float,
        default=0.0,
        help="share of compared tokens allowed over the tolerance and still pass (default 0)",
    )
    verify.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if any)")
    verify.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default="float32",
        help="the dtype to score in (default float32; auto: the checkpoint's)",
    )
    verify.add_argument("--json", action="store_true", help="print the whole report as JSON")
    verify.add_argument("--quiet", action="store_true", help="list only the sequences that fail")
    _add_selection_options(verify)
    _add_db_option(verify)

    drift = commands.add_parser(
        "drift",
        help="report where re-tokenizing a trajectory's text would change its token IDs",
        description=(
            "Decode each recorded prompt and response of a trajectory, encode the text again with the "
            "model's tokenizer, and report where the IDs differ. Needs the drift extra: "
            "pip install 'tokentrail[drift]'."
        ),
    )
    drift.add_argument("trajectory_id", help="the trajectory (X-Trajectory-Id) to check")
    drift.add_argument("--tokenizer", required=True, help="tokenizer.json, or a model folder holding one")
    _add_db_option(drift)
    drift.add_argument("--json", action="store_true", help="print every sequence's report as JSON")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in _SETTING_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            value = ",".join(value)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"tokentrail: invalid setting {field}: {error['msg']}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            sockets = Sockets(args.fleet_socket, args.recorder_socket)
            return _serve(settings, args.worker_slot, args.supervisor_pid, sockets)
        if args.command == "db":
            if args.db_command == "prune":
                return _db_prune(settings, args)
            return _db_vacuum(settings) if args.db_command == "vacuum" else _db_upgrade(settings)
        if args.command == "reward":
            return _reward(settings, args.trajectory_id, args.value, args.metadata, args.finish)
        if args.command == "export":
            return _export(settings, args)
        if args.command == "verify":
            return _verify(settings, args)
        if args.command == "drift":
            return _drift(settings, args.trajectory_id, args.tokenizer, args.json)
        return _sql(settings, args.query, "json" if args.json else "csv" if args.csv else "table")
    except (DatabaseTooNewError, SpoolInUseError, WorkersError) as exc:
        print(f"tokentrail: {exc}", file=sys.stderr)
        return 2


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@dataclass(frozen=True)
class Sockets:
    """Where a worker reaches its supervisor's control plane and the host's recorder."""

    fleet: Path | None = None
    recorder: Path | None = None


def _serve(
    settings: Settings,
    worker_slot: int | None,
    supervisor_pid: int | None = None,
    sockets: Sockets | None = None,
) -> int:
    """One proxy process; or, with several workers and no slot, the supervisor that starts them."""
    _configure_logging(settings.log_level)
    if worker_slot is None:
        for spool in stranded_spools(settings.fallback_path, settings.workers, settings.recorder):
            logger.warning(
                "path=<%s>, workers=<%d> | records wait in the spool of a worker this run does not start "
                "(or of the other TOKENTRAIL_RECORDER); run it that way again to replay them",
                spool,
                settings.workers,
            )
    if worker_slot is None and settings.workers > 1:
        _migrate(settings)  # once, before any worker opens the database
        recorder = None
        if settings.recorder == "process":
            from tokentrail.proxy.recorder.keeper import RecorderKeeper

            recorder = RecorderKeeper({**os.environ, **settings.environment()})
        return Supervisor(settings, recorder).run()
    if worker_slot is not None:
        die_with_supervisor(supervisor_pid or os.getppid())
    # First: a second proxy on this spool stops here.
    claim = SpoolClaim(spool_of(settings, worker_slot or 0))
    try:
        if worker_slot is None:
            _migrate(settings)
        _run_uvicorn(settings, worker_slot, sockets or Sockets())
    finally:
        claim.release()
    return 0


def _migrate(settings: Settings) -> None:
    from tokentrail.proxy.storage.migrate import upgrade_database

    before, after = upgrade_database(settings.db)
    if before != after:
        logger.info("from=<%s>, to=<%s> | database migrated", before, after)


def _run_uvicorn(settings: Settings, worker_slot: int | None, sockets: Sockets) -> None:
    import uvicorn

    from tokentrail.proxy.app import create_app
    from tokentrail.proxy.server.http_limits import limited_protocol
    from tokentrail.proxy.server.own_headers import UVICORN_OPTIONS

    config = uvicorn.Config(
        create_app(
            settings, worker=worker_slot, fleet_socket=sockets.fleet, recorder_socket=sockets.recorder
        ),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        lifespan="on",
        http=limited_protocol(settings.max_header_bytes, settings.client_header_timeout_s),
        # X-Forwarded-* rewriting of the client address costs 4% of the event loop at 64 concurrent
        # calls, for an address nothing in TokenTrail uses.
        proxy_headers=False,
        **UVICORN_OPTIONS,  # no date/server of uvicorn's on relayed answers: vLLM's own go through
    )
    server = uvicorn.Server(config)
    # A worker binds the port shared (SO_REUSEPORT) with its siblings; a single proxy as uvicorn does.
    listening = None
    if worker_slot is not None:
        try:
            listening = [listening_socket(settings.host, settings.port, shared=True)]
        except OSError as exc:
            logger.error("worker=<%d>, error=<%s> | cannot listen on the port", worker_slot, exc.strerror)
            raise SystemExit(1) from None
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=listening)
    if not server.started:
        raise SystemExit(3)  # what uvicorn.run does when startup fails


def _db_upgrade(settings: Settings) -> int:
    from tokentrail.proxy.storage.migrate import upgrade_database

    before, after = upgrade_database(settings.db)
    if before == after:
        print(f"database already at {after}")
    else:
        print(f"database migrated from {before or 'empty'} to {after}")
        if before is not None:
            print("run `tokentrail db vacuum` (TokenTrail stopped) to give converted rows' space back")
    return 0


def _db_vacuum(settings: Settings) -> int:
    from tokentrail.proxy.storage.migrate import vacuum_database

    before, after = vacuum_database(settings.db)
    print(f"database compacted: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
    return 0


def _parse_tags(items: list[str]) -> dict[str, str] | None:
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--tag {item!r} is not key=value")
        tags[key] = value
    return tags


def _parse_time(option: str, value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        raise ValueError(f"{option} {value!r} is not an ISO date or time") from None


def _read_ids(source: str) -> tuple[str, ...]:
    from pathlib import Path

    lines = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return tuple(line.strip() for line in lines.splitlines() if line.strip())


def _db_prune(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from tokentrail.proxy.storage.engine import make_engine, sqlite_path
    from tokentrail.proxy.storage.prune import DEFAULT_BATCH, PruneSelection, plan, prune

    try:
        selection = PruneSelection(
            before=_parse_time("--before", args.before),
            tags=_parse_tags(args.tag) or None,
            finished=True if args.finished else False if args.unfinished else None,
            exported=args.exported,
            trajectory_ids=None if args.ids is None else _read_ids(args.ids),
        )
        selection.check()
    except (ValueError, OSError) as exc:  # EmptySelectionError included
        print(f"tokentrail: {exc}", file=sys.stderr)
        return 2
    path = sqlite_path(settings.db)
    if path is not None and not path.exists():
        print(f"tokentrail: no database at {path}", file=sys.stderr)
        return 1
    engine = make_engine(settings.db, settings.db_busy_timeout_ms)
    try:
        if not args.yes:
            would = plan(engine, selection)
            print(f"would delete {would.line()} (dry run: add --yes to delete them)")
            return 0
        # without adding up bytes: that reads every row once more, inside the batches' transactions
        batch = DEFAULT_BATCH if args.batch is None else max(1, args.batch)
        done = prune(engine, selection, batch=batch, measure=False)
    except SQLAlchemyError as exc:  # each batch is whole or not at all: what was deleted stays deleted
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"tokentrail: database error, prune stopped: {message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(
        f"deleted {done.line(with_bytes=False)} in {done.seconds:.1f} s ({done.batches} batches, longest "
        f"{done.longest_batch_s * 1000:.0f} ms); new records reuse the space, `tokentrail db vacuum` "
        "(TokenTrail stopped) gives it back to the file system"
    )
    return 0


def _sql(settings: Settings, query: str, fmt: str) -> int:
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from tokentrail.proxy.storage.engine import make_engine, sqlite_path

    path = sqlite_path(settings.db)
    if path is not None and not path.exists():
        print(f"tokentrail: no database at {path}; run `tokentrail db upgrade` first", file=sys.stderr)
        return 1
    engine = make_engine(settings.db)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(query))
            if not result.returns_rows:
                print(f"{result.rowcount} row(s) affected")
                return 0
            columns = list(result.keys())
            rows = [tuple(row) for row in result]
    except SQLAlchemyError as exc:
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"tokentrail: SQL error: {message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if fmt == "json":
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=_json_default))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        print(format_table(columns, rows))
    return 0


def _reward(
    settings: Settings, trajectory_id: str, value: float, metadata_text: str | None, finish: bool
) -> int:
    import math

    from tokentrail.proxy.errors import ProxyRequestError
    from tokentrail.proxy.relay.routing import validate_trajectory_id
    from tokentrail.proxy.storage import queries
    from tokentrail.proxy.storage.engine import make_engine

    if not math.isfinite(value):
        print("tokentrail: the reward must be a finite number", file=sys.stderr)
        return 2
    try:
        validate_trajectory_id(trajectory_id.encode(), "trajectory id")
        metadata = json.loads(metadata_text) if metadata_text else None
    except (ProxyRequestError, ValueError) as exc:
        print(f"tokentrail: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    if metadata is not None and not isinstance(metadata, dict):
        print("tokentrail: --metadata must be a JSON object", file=sys.stderr)
        return 2
    engine = make_engine(settings.db)
    try:
        with engine.begin() as connection:
            queries.set_reward(connection, trajectory_id, value, metadata)
            if finish:
                queries.finish(connection, trajectory_id)
    finally:
        engine.dispose()
    print(f"trajectory {trajectory_id}: reward {value}" + (", finished" if finish else ""))
    return 0


def _selection(args: argparse.Namespace) -> Any:
    """Export's selection options as a TrajectoryFilter; a ValueError names the bad option."""
    from tokentrail.proxy.storage.queries import TrajectoryFilter

    return TrajectoryFilter(
        since=_parse_time("--since", args.since),
        until=_parse_time("--until", args.until),
        finished=True if args.finished else None,
        tags=_parse_tags(args.tag) or None,
    )


def _export(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokentrail.proxy.storage.engine import make_engine
    from tokentrail.proxy.training.archive import PartitionedSink, describe, partition_key
    from tokentrail.proxy.training.export import (
        SequenceSink,
        mark_exported,
        open_sink,
    )
    from tokentrail.proxy.training.policy import UnknownWeightVersionError

    try:
        filters = _selection(args)
        key = partition_key(args.split)
    except ValueError as exc:  # BadSplitError included
        print(f"tokentrail: {exc}", file=sys.stderr)
        return 2
    try:
        sink: SequenceSink | PartitionedSink = (
            open_sink(args.format, Path(args.out))
            if args.out
            else PartitionedSink(args.format, args.out_dir, key)
        )
    except ImportError:
        print(
            "tokentrail: Parquet and --out-dir URLs need the export extra: pip install 'tokentrail[export]'",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as exc:  # no such folder, no permission; pyarrow: an unknown URL scheme
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"tokentrail: cannot write {args.out or args.out_dir}: {reason}", file=sys.stderr)
        return 2
    engine = make_engine(settings.db)
    try:
        summary = _sequences_into(engine, sink, filters, args, remember_read=args.mark_exported)
        marked = mark_exported(engine, summary.read) if args.mark_exported else None
    except UnknownWeightVersionError as exc:
        print(f"tokentrail: --min-weight-version: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    written = f"{args.out_dir} ({describe(sink.files)})" if isinstance(sink, PartitionedSink) else args.out
    print(f"wrote {written}: {summary.line()}")
    if marked is not None:
        print(f"marked {marked} of {summary.trajectories} trajectories exported (others changed meanwhile)")
    return 0


def _sequences_into(
    engine: Any, sink: Any, filters: Any, args: argparse.Namespace, *, remember_read: bool = False
) -> Any:
    """The selected trajectories' sequences into ``sink`` with a progress bar (``export`` and
    ``verify --db`` alike); raises ``UnknownWeightVersionError``."""
    from tqdm import tqdm

    from tokentrail.proxy.training.export import count_trajectories, export
    from tokentrail.proxy.training.policy import PolicyFilter
    from tokentrail.proxy.training.sequences import SequenceMode

    total = count_trajectories(engine, filters)
    with tqdm(total=total, unit="traj", file=sys.stderr, disable=None) as bar:
        return export(
            engine,
            sink,
            filters,
            SequenceMode(args.mode),
            max(1, args.batch),
            lambda n: bar.update(n),
            by_group=args.by_group,
            policy_filter=PolicyFilter(args.min_weight_version, args.max_staleness, args.certificate),
            remember_read=remember_read,
        )


_SELECTION_OPTIONS = (
    "db", "since", "until", "tag", "finished", "mode", "by_group", "min_weight_version", "max_staleness",
    "certificate",
)  # fmt: skip


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    import tokentrail.proxy.training.verify as verify

    chosen = [name for name in _SELECTION_OPTIONS if getattr(args, name) not in (None, False, [], "merged")]
    if args.file is not None and chosen:
        options = ", ".join("--" + name.replace("_", "-") for name in chosen)
        print(f"tokentrail: {options} select from the database: give them without FILE", file=sys.stderr)
        return 2
    if args.file is not None and not Path(args.file).is_file():
        print(f"tokentrail: no file {args.file}", file=sys.stderr)
        return 2
    try:
        scorer = verify.Scorer(args.model, args.device, args.dtype)
        if args.file is not None:
            path = Path(args.file)
            with tqdm(total=verify.count_export(path), unit="seq", file=sys.stderr, disable=None) as bar:
                report = verify.verify(scorer, verify.read_export(path), args.tolerance, bar.update)
        else:
            report = _verify_database(settings, args, scorer)
    except verify.VerifyError as exc:
        print(f"tokentrail: {exc}", file=sys.stderr)
        return 2
    passed = report.passed(args.max_over)
    if args.json:
        print(json.dumps({**report.as_dict(), "passed": passed}))
    else:
        columns = ["trajectory_id", "sequence", "compared", "mean_abs", "max_abs", "over", "first_over"]
        shown = [s for s in report.sequences if not (args.quiet and s.ok)]
        rows = [
            (
                s.trajectory_id,
                s.sequence_index,
                s.compared if not s.missing else f"{s.compared} ({s.missing} without logprob)",
                f"{s.mean_abs_delta:.4f}",
                f"{s.max_abs_delta:.4f}",
                s.over_tolerance,
                s.first_over if s.first_over is not None else s.first_missing,
            )
            for s in shown
        ]
        if rows:
            print(format_table(columns, rows))
        print(f"{'PASS' if passed else 'FAIL'}: {report.line()}")
    return 0 if passed else 1


def _verify_database(settings: Settings, args: argparse.Namespace, scorer: Any) -> Any:

    import tokentrail.proxy.training.verify as verify
    from tokentrail.proxy.storage.engine import make_engine
    from tokentrail.proxy.training.policy import UnknownWeightVersionError

    try:
        filters = _selection(args)
    except ValueError as exc:
        raise verify.VerifyError(str(exc)) from None
    sink = verify.ScoringSink(scorer, args.tolerance)
    engine = make_engine(settings.db)
    try:
        _sequences_into(engine, sink, filters, args)
    except UnknownWeightVersionError as exc:
        raise verify.VerifyError(f"--min-weight-version: {exc}") from None
    finally:
        engine.dispose()
    return sink.finish()


def _drift(settings: Settings, trajectory_id: str, tokenizer_path: str, as_json: bool) -> int:
    try:
        from tokentrail.client.drift import drift_report, load_tokenizer
    except ImportError as exc:
        print(
            f"tokentrail: drift needs the drift extra ({exc.name} is missing): "
            "pip install 'tokentrail[drift]'",
            file=sys.stderr,
        )
        return 1
    from sqlalchemy import text

    from tokentrail.proxy.storage.engine import make_engine

    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as exc:
        print(f"tokentrail: cannot load the tokenizer: {exc}", file=sys.stderr)
        return 1
    engine = make_engine(settings.db)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT c.seq, c.prompt_token_ids, d.choice_index, d.token_ids FROM llm_calls c "
                    "LEFT JOIN completions d ON d.call_id = c.id WHERE c.trajectory_id = :t "
                    "ORDER BY c.seq, d.choice_index"
                ),
                {"t": trajectory_id},
            ).all()
    finally:
        engine.dispose()
    if not rows:
        print(f"tokentrail: no calls recorded for trajectory {trajectory_id!r}", file=sys.stderr)
        return 1
    reports: list[dict[str, Any]] = []
    seen_prompts: set[int] = set()
    for seq, prompt_ids, choice_index, token_ids in rows:
        parts = []
        if seq not in seen_prompts:
            seen_prompts.add(seq)
            parts.append(("prompt", _ids(prompt_ids)))
        if choice_index is not None:
            parts.append((f"choice {choice_index}", _ids(token_ids)))
        for part, ids in parts:
            report = drift_report(ids, tokenizer)
            reports.append(
                {
                    "seq": seq,
                    "part": part,
                    "tokens": report.recorded_length,
                    "retokenized": report.retokenized_length,
                    "drift_spans": len(report.spans),
                    "first_position": report.first_position,
                    "differing_tokens": report.differing_tokens,
                    "spans": [vars(span) for span in report.spans],
                }
            )
    drifted = [r for r in reports if r["drift_spans"]]
    if as_json:
        print(json.dumps(reports))
    else:
        columns = [
            "seq",
            "part",
            "tokens",
            "retokenized",
            "drift_spans",
            "first_position",
            "differing_tokens",
        ]
        print(format_table(columns, [tuple(r[c] for c in columns) for r in reports]))
    print(
        f"{len(drifted)} of {len(reports)} sequences drift; "
        f"{sum(r['differing_tokens'] for r in reports)} of {sum(r['tokens'] for r in reports)} tokens differ",
        file=sys.stderr if as_json else sys.stdout,
    )
    return 0


def _ids(value: Any) -> list[int]:
    if isinstance(value, str):
        value = json.loads(value)
    return [int(v) for v in value or []]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _cell(value: Any) -> str:
    """One table cell: control characters escaped (ids cannot break the layout), long ones cut."""
    text = "NULL" if value is None else str(value)
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def format_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """A plain aligned table with a row count, like psql's."""
    cells = [[_cell(v) for v in row] for row in rows]
    header = [_cell(c) for c in columns]
    widths = [max([len(header[i])] + [len(r[i]) for r in cells]) for i in range(len(header))]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
