"""What the fleet's control plane costs: a pause and a resume through TokenTrail, one process against
``serve --workers N`` (the supervisor's control plane, every worker told over its Unix socket), and
replicas sharing control over their database (``TOKENTRAIL_FLEET_CONTROL=database``).

    python bench/fleet_control.py                 # 1 and 3 workers, then 1 and 2 replicas on PostgreSQL
    python bench/fleet_control.py --db sqlite     # the replicas on one SQLite file instead

A call pays nothing for it: the pause gate is each worker's own, set by the control plane, and read
on the request path as before. A pause or resume pays one round of commands to every worker and, with
replicas, a write of the control row and every other replica's acknowledgement (each reads the row
every 50 ms); this prints the median and the slowest of each, beside the same pair sent straight to
the fake vLLM (what the upstreams' own routes cost). The last column is what an idle TokenTrail
costs, all its processes together: with replicas it reads the control row and writes its heartbeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from targets import (  # noqa: E402
    cpu_seconds,
    fresh_postgres_database,
    serve_tokentrail,
    tests_fake_upstream,
    throwaway_postgres,
)

PAUSE, RESUME = "/tokentrail/v1/pause?mode=keep", "/tokentrail/v1/resume"
IDLE_S = 5.0


def _pairs(url: str, pause: str, resume: str, count: int) -> tuple[list[float], list[float]]:
    pauses, resumes = [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.post(url + pause).raise_for_status()
            pauses.append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            client.post(url + resume).raise_for_status()
            resumes.append(1000 * (time.perf_counter() - started))
    return pauses, resumes


def _line(name: str, pauses: list[float], resumes: list[float], idle: float | None = None) -> str:
    idle_text = "" if idle is None else f"   idle CPU {1000 * idle:5.1f} ms/s"
    return (
        f"{name:38} pause {statistics.median(pauses):6.1f} ms (max {max(pauses):6.1f})   "
        f"resume {statistics.median(resumes):6.1f} ms (max {max(resumes):6.1f}){idle_text}"
    )


def _idle_cpu(pids: list[int]) -> float:
    """CPU seconds per second of ``pids`` (and their children) while nothing is sent."""
    before = sum(cpu_seconds(pid) for pid in pids)
    time.sleep(IDLE_S)
    return (sum(cpu_seconds(pid) for pid in pids) - before) / IDLE_S


def _cell(
    name: str, upstream: str, db_url: str, tmp: Path, replicas: int, pairs: int, **settings: str
) -> None:
    with ExitStack() as stack:
        started = [
            stack.enter_context(serve_tokentrail(upstream, db_url, tmp / f"r{i}", **settings))
            for i in range(replicas)
        ]
        idle = _idle_cpu([pid for _, pid in started])
        print(_line(name, *_pairs(started[0][0], PAUSE, RESUME, pairs), idle), flush=True)


def _fresh_database(server: str | None, tmp: Path) -> str:
    if server is None:
        return f"sqlite:///{tmp / f'replicas-{time.monotonic_ns()}.sqlite'}"
    return fresh_postgres_database(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql", help="the replicas'")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokentrail-fleet-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        upstream = tests_fake_upstream(stack)
        print(_line("vLLM's own routes", *_pairs(upstream, "/pause?mode=keep", "/resume", args.pairs)))
        for workers in args.workers:
            sqlite = f"sqlite:///{tmp / f'w{workers}.sqlite'}"
            name = f"one host, {workers} worker(s), SQLite"
            _cell(name, upstream, sqlite, tmp / f"w{workers}", 1, args.pairs, TOKENTRAIL_WORKERS=str(workers))
        server = throwaway_postgres(stack) if args.db == "postgresql" else None
        for replicas, control in ((1, "host"), (1, "database"), (2, "database")):
            name = f"{replicas} replica(s), {args.db}, control {control}"
            db_url = _fresh_database(server, tmp)
            settings = {"TOKENTRAIL_FLEET_CONTROL": control}
            _cell(name, upstream, db_url, tmp / f"{replicas}-{control}", replicas, args.pairs, **settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
