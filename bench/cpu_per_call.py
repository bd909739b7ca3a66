"""TokenTrail's CPU time per call, this checkout against another, alternated in one run: a guard.

    python bench/cpu_per_call.py --against ../baseline          # prints the table
    python bench/cpu_per_call.py --against ../baseline --max-regression 0.10   # exit 1 past +10%
    python bench/cpu_per_call.py --against . --env TOKENTRAIL_RECORDER=process   # one setting vs another

Why CPU time: on a shared machine throughput and latency move with whatever else runs, while the CPU
seconds the proxy process (all its threads, the writer's included) spends per call stay steady. Both
checkouts are started the same way (their own ``.venv``, ``tokentrail serve``, one core) in front of
one fake vLLM, and measured cell by cell in alternation (``--rounds``): each cell's CPU per 1,000
calls is the median over the rounds, so a noisy minute hits both alike. ``--against`` is any
checkout of TokenTrail with its own ``.venv`` (``git worktree add ../baseline <commit>``, then the
README's install). The CPU is read from ``/proc`` after every record of the cell is written, so the
writer's work for those calls is counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from targets import (  # noqa: E402
    FAKE_VLLM,
    cpu_seconds,
    free_port,
    main_thread_cpu_seconds,
    pinned,
    tokentrail_env,
    wait_http,
    wait_written,
)


@dataclass(frozen=True)
class Cell:
    name: str
    stream: bool
    concurrency: int
    delay_ms: float = 0.0


CELLS = (
    Cell("non-stream c64", False, 64),
    Cell("stream 2ms c64", True, 64, 2.0),
)


def _measure(
    checkout: Path, cell: Cell, upstream: str, args: argparse.Namespace, tmp: Path, extra: dict[str, str]
) -> tuple[float, float, int]:
    """(CPU seconds, of which the event loop's, calls) of one ``tokentrail serve`` from ``checkout``
    over one cell."""
    python = checkout / ".venv" / "bin" / "python"
    port = free_port()
    db_url = f"sqlite:///{tmp / 'bench.db'}"
    env = tokentrail_env(upstream, db_url, port, tmp, **extra)
    command = [str(python), "-m", "tokentrail.proxy.cli", "serve"]
    process = subprocess.Popen(pinned(args.proxy_core, command, args.no_pin), env=env, cwd=checkout)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/tokentrail/health", process)
        load = [
            sys.executable,
            str(BENCH / "loadgen.py"),
            *("--url", url, "--duration", str(args.duration), "--warmup", "0"),
            *("--concurrency", str(cell.concurrency), "--max-tokens", "32"),
            *(["--stream"] if cell.stream else []),
            *(["--token-delay-ms", str(cell.delay_ms)] if cell.delay_ms else []),
        ]
        before = cpu_seconds(process.pid)
        loop_before = main_thread_cpu_seconds(process.pid)
        output = subprocess.run(
            pinned(args.other_core, load, args.no_pin), check=True, capture_output=True, text=True
        ).stdout
        result = json.loads(output)
        calls = int(result["total_sent"])
        wait_written(db_url, tmp, calls)
        loop = main_thread_cpu_seconds(process.pid) - loop_before
        return cpu_seconds(process.pid) - before, loop, calls
    finally:
        process.terminate()
        process.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, required=True, help="another checkout with its .venv")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two (median)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per cell")
    parser.add_argument("--max-regression", type=float, help="exit 1 when this checkout is this much worse")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="a setting for this checkout"
    )
    parser.add_argument(
        "--against-env", action="append", default=[], metavar="KEY=VALUE", help="a setting for the other"
    )
    parser.add_argument("--proxy-core", default="0")
    parser.add_argument("--other-core", default="1")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    checkouts = {"this": ROOT, "against": args.against.resolve()}
    settings = {
        "this": dict(item.split("=", 1) for item in args.env),
        "against": dict(item.split("=", 1) for item in args.against_env),
    }
    per_1000: dict[tuple[str, str], list[float]] = {}
    loop_per_1000: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tokentrail-cpu-") as tmp_dir:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        fake = subprocess.Popen(pinned(args.other_core, [*FAKE_VLLM, str(port)], args.no_pin))
        try:
            wait_http(upstream + "/health", fake)
            for round_ in range(args.rounds):
                for cell in CELLS:
                    order = ("this", "against") if round_ % 2 == 0 else ("against", "this")
                    for name in order:
                        tmp = Path(tmp_dir) / f"{name}-{round_}-{cell.name.replace(' ', '-')}"
                        tmp.mkdir()
                        cpu_s, loop_s, calls = _measure(
                            checkouts[name], cell, upstream, args, tmp, settings[name]
                        )
                        per_1000.setdefault((cell.name, name), []).append(1000 * 1000 * cpu_s / max(calls, 1))
                        loop_per_1000.setdefault((cell.name, name), []).append(1e6 * loop_s / max(calls, 1))
                        print(f"round {round_ + 1} {cell.name:16} {name:8} {calls:6} calls, "
                              f"{1000 * cpu_s / max(calls, 1):.3f} ms CPU per call", flush=True)  # fmt: skip
        finally:
            fake.terminate()
            fake.wait(30)
    worst = 0.0
    print(
        f"\nms of proxy CPU per 1,000 calls, median of {args.rounds} (this: {ROOT}, against: {args.against})"
    )
    print("(loop: the relay's event loop alone, without the writer thread or the recorder process)")
    print(
        f"{'cell':18} {'this':>8} {'against':>8} {'this/against':>13} {'loop this':>10} {'loop against':>13}"
    )
    for cell in CELLS:
        mine = statistics.median(per_1000[(cell.name, "this")])
        theirs = statistics.median(per_1000[(cell.name, "against")])
        ratio = mine / theirs if theirs else float("inf")
        worst = max(worst, ratio - 1)
        loops = [statistics.median(loop_per_1000[(cell.name, n)]) for n in ("this", "against")]
        print(f"{cell.name:18} {mine:8.0f} {theirs:8.0f} {ratio:13.3f} {loops[0]:10.0f} {loops[1]:13.0f}")
    if args.max_regression is not None and worst > args.max_regression:
        print(f"regression: {worst:+.1%} past the allowed {args.max_regression:+.0%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
