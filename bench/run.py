"""Side-by-side benchmark: direct, nginx, a naive FastAPI + httpx passthrough and TokenTrail, one run.

    python bench/run.py                      # full matrix against the fast fake vLLM (about 5 min)
    python bench/run.py --quick              # the headline cells only
    python bench/run.py --upstream URL       # direct vs TokenTrail against a real vLLM

Every proxy under test is pinned to one core (``--proxy-core``), the fake upstream and the load
generator to the other (``--other-core``), so a proxy can never borrow the load generator's CPU. On a
bigger machine ``--workers 4 --proxy-core 0-3 --other-core 4-7`` gives TokenTrail four worker processes
(``serve --workers``) and nginx four worker processes on four cores (the naive passthrough stays one). For
each scenario the targets are measured one after another, so their ratios come from the same minutes
of the same machine. Cells: non-streaming, streaming with 0 and 2 ms per token; prompts of 40 and
4,000 tokens; concurrency 1, 16, 64; plus text completions. ``--repeat 3`` prints the median of three.

After the load, the runner checks TokenTrail's database: one row per call it answered, and for a
sample of rows the stored prompt and generated IDs equal the fake upstream's deterministic IDs.
nginx comes from Debian's ``nginx-light`` package; without it that column is left out.
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
from typing import Any

import httpx
from sqlalchemy import create_engine, text

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from fake_vllm import generated_id, prompt_id  # noqa: E402
from targets import Targets, add_target_options, pinned, rss_mib, wait_written  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    concurrency: int
    prompt_tokens: int = 40
    delay_ms: float = 0.0
    route: str = "chat"

    def loadgen_args(self, max_tokens: int) -> list[str]:
        args = [
            "--route",
            self.route,
            "--concurrency",
            str(self.concurrency),
            "--prompt-tokens",
            str(self.prompt_tokens),
            "--max-tokens",
            str(max_tokens),
            "--token-delay-ms",
            str(self.delay_ms),
        ]
        return args + (["--stream"] if self.stream else [])


def full_matrix() -> list[Scenario]:
    cells = []
    for prompt in (40, 4000):
        for mode, stream, delay in (
            ("non-stream", False, 0.0),
            ("stream", True, 0.0),
            ("stream 2ms", True, 2.0),
        ):
            for concurrency in (1, 16, 64):
                cells.append(Scenario(f"{mode} p{prompt} c{concurrency}", stream, concurrency, prompt, delay))
    cells.append(Scenario("text non-stream p40 c16", False, 16, route="completions"))
    cells.append(Scenario("text stream p40 c16", True, 16, route="completions"))
    return cells


def quick_matrix() -> list[Scenario]:
    return [
        Scenario("non-stream p40 c1", False, 1),
        Scenario("non-stream p40 c64", False, 64),
        Scenario("stream 2ms p40 c64", True, 64, delay_ms=2.0),
        Scenario("stream p4000 c16", True, 16, prompt_tokens=4000),
    ]


def real_vllm_matrix() -> list[Scenario]:
    return [
        Scenario("non-stream p40 c1", False, 1),
        Scenario("non-stream p40 c16", False, 16),
        Scenario("stream p40 c1", True, 1),
        Scenario("stream p40 c16", True, 16),
    ]


def _load(
    args: argparse.Namespace, url: str, scenario: Scenario, model: str, prefix: str | None
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--url",
        url,
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--model",
        model,
        *scenario.loadgen_args(args.max_tokens),
    ]
    if prefix is not None:
        command += ["--trajectory-prefix", prefix]
    output = subprocess.run(
        pinned(args.other_core, command, args.no_pin), check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(output)
    return result


def _verify(db_url: str, expected_calls: int, sample: int = 200, *, fake_ids: bool = True) -> list[str]:
    """Problems found in TokenTrail's database (empty when every call is there with exact IDs).

    Every row must say ``integrity = 'ok'`` (its ID counts equal vLLM's usage); against the fake
    upstream, sampled rows must also hold exactly its deterministic IDs.
    """
    problems = []
    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*) FROM llm_calls")).scalar_one()
        if rows != expected_calls:
            problems.append(f"{rows} call rows for {expected_calls} calls answered")
        bad = connection.execute(
            text("SELECT count(*) FROM llm_calls WHERE outcome != 'ok' OR integrity != 'ok'")
        ).scalar_one()
        if bad:
            problems.append(f"{bad} rows not ok")
        picked = connection.execute(
            text(
                "SELECT c.prompt_token_ids, c.prompt_tokens, p.token_ids, p.choice_index, "
                "c.completion_tokens "
                "FROM llm_calls c JOIN completions p ON p.call_id = c.id ORDER BY random() LIMIT :n"
            ),
            {"n": sample if fake_ids else 0},
        ).all()
    engine.dispose()
    for prompt_raw, prompt_count, generated_raw, choice, completion_count in picked:
        prompt = json.loads(prompt_raw) if isinstance(prompt_raw, str) else prompt_raw
        generated = json.loads(generated_raw) if isinstance(generated_raw, str) else generated_raw
        if prompt != [prompt_id(i) for i in range(prompt_count)]:
            problems.append("stored prompt IDs differ from the upstream's")
        if generated != [generated_id(i, choice) for i in range(completion_count)]:
            problems.append("stored generated IDs differ from the upstream's")
    if problems:
        return sorted(set(problems))
    return [f"{rows} rows, all ok" + (f"; checked {len(picked)} sampled rows' IDs" if picked else "")]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="only the headline cells")
    parser.add_argument("--upstream", help="a real vLLM: direct vs TokenTrail only")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=1, help="runs of the matrix; the median is printed")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per call")
    add_target_options(parser, "direct,nginx,naive,tokentrail")
    parser.add_argument("--json-out", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if args.upstream:
        args.targets = "direct,tokentrail"
        args.no_pin = True  # a real vLLM wants every core it can get
        scenarios = real_vllm_matrix()
    else:
        scenarios = quick_matrix() if args.quick else full_matrix()
    with tempfile.TemporaryDirectory() as tmp_name:
        targets = Targets(args, Path(tmp_name))
        targets.start()
        model = "fake"
        if args.upstream:
            model = httpx.get(targets.urls["direct"] + "/v1/models", timeout=10).json()["data"][0]["id"]
        names = [t for t in args.targets.split(",") if t in targets.urls]
        measurements: dict[tuple[str, str], list[dict[str, Any]]] = {}
        tokentrail_calls = 0
        recorder_calls = 0
        rss: list[float] = []
        try:
            for repeat in range(args.repeat):
                for index, scenario in enumerate(scenarios):
                    for name in names:
                        recording = name in ("tokentrail", "recorder")  # (both numbered per trajectory)
                        prefix = f"bench-{repeat}-{index}" if recording else None
                        result = _load(args, targets.urls[name], scenario, model, prefix)
                        measurements.setdefault((scenario.name, name), []).append(result)
                        if name == "tokentrail":
                            tokentrail_calls += result["total_ok"]
                            rss.append(rss_mib(targets.tokentrail_pid))
                        if name == "recorder":
                            recorder_calls += result["total_ok"]
                        print(
                            f"  {scenario.name:<26}{name:<11}{result['calls_per_s']:>9.0f} calls/s",
                            file=sys.stderr,
                        )
            writer = (
                wait_written(targets.db_url, targets.tmp, tokentrail_calls) if "tokentrail" in names else None
            )
            if "recorder" in names:
                wait_written(targets.recorder_db_url, targets.tmp / "recorder", recorder_calls)
        finally:
            targets.stop()
        problems = (
            _verify(targets.db_url, tokentrail_calls, fake_ids=not args.upstream)
            if writer is not None
            else []
        )
        if "recorder" in names:
            problems += [
                "recorder: " + p
                for p in _verify(targets.recorder_db_url, recorder_calls, fake_ids=not args.upstream)
            ]
        db_bytes = Path(targets.db_url.removeprefix("sqlite:///")).stat().st_size if writer is not None else 0
    _print_table(scenarios, names, measurements, args)
    if writer is not None:
        print(
            f"\nTokenTrail: {tokentrail_calls} calls answered, {writer['records_written']} records written, "
            f"{writer['records_failed']} failed; RSS {min(rss):.0f}-{max(rss):.0f} MiB over the run; "
            f"database {db_bytes / 2**20:.1f} MiB"
        )
        print("check: " + "; ".join(problems))
    if args.json_out:
        flat = [{"scenario": s, "target": t, "runs": runs} for (s, t), runs in measurements.items()]
        args.json_out.write_text(json.dumps(flat, indent=1))
    return 1 if any("all ok" not in p for p in problems) else 0


def _print_table(
    scenarios: list[Scenario],
    names: list[str],
    measurements: dict[tuple[str, str], list[dict[str, Any]]],
    args: argparse.Namespace,
) -> None:
    print(
        f"\n{args.duration:g} s per cell, {args.max_tokens} generated tokens per call, "
        f"median of {args.repeat} run(s); proxies pinned to core {args.proxy_core}"
        f"{f' ({args.workers} workers)' if args.workers > 1 else ''}, "
        f"upstream and load generator to core {args.other_core}"
        if not args.no_pin
        else f"\n{args.duration:g} s per cell, not pinned"
    )
    header = f"{'scenario':<26}{'target':<11}{'calls/s':>9} {'x direct':>8} {'p50 ms':>7} {'p99 ms':>7}"
    header += f" {'+p50':>7} {'+p99':>7} {'ttft':>7} {'+ttft':>7} {'err':>4}"
    print(header)
    for scenario in scenarios:
        direct = measurements.get((scenario.name, "direct"))
        for name in names:
            runs = measurements[(scenario.name, name)]
            cps = _median([r["calls_per_s"] for r in runs])
            p50 = _median([r["p50_ms"] for r in runs])
            p99 = _median([r["p99_ms"] for r in runs])
            ttft = _median([r["ttft_p50_ms"] for r in runs]) if scenario.stream else None
            errors = sum(r["errors"] for r in runs)
            ratio = add50 = add99 = addttft = None
            if direct is not None and name != "direct":
                ratio = _median(
                    [r["calls_per_s"] / d["calls_per_s"] for r, d in zip(runs, direct, strict=True)]
                )
                add50 = _median([r["p50_ms"] - d["p50_ms"] for r, d in zip(runs, direct, strict=True)])
                add99 = _median([r["p99_ms"] - d["p99_ms"] for r, d in zip(runs, direct, strict=True)])
                if scenario.stream:
                    addttft = _median(
                        [r["ttft_p50_ms"] - d["ttft_p50_ms"] for r, d in zip(runs, direct, strict=True)]
                    )
            print(
                f"{scenario.name:<26}{name:<11}{_fmt(cps, 0):>9} {_fmt(ratio):>8} {_fmt(p50):>7}"
                f" {_fmt(p99):>7} {_fmt(add50):>7} {_fmt(add99):>7} {_fmt(ttft):>7} {_fmt(addttft):>7}"
                f" {errors:>4}"
            )
        _print_extra_ratios(scenario, names, measurements)


def _print_extra_ratios(
    scenario: Scenario, names: list[str], measurements: dict[tuple[str, str], list[dict[str, Any]]]
) -> None:
    parts = []
    for ours_name in ("tokentrail", "recorder"):
        if ours_name not in names:
            continue
        ours = measurements[(scenario.name, ours_name)]
        for other in ("naive", "nginx"):
            if other in names:
                theirs = measurements[(scenario.name, other)]
                ratio = _median(
                    [a["calls_per_s"] / b["calls_per_s"] for a, b in zip(ours, theirs, strict=True)]
                )
                parts.append(f"{ours_name}/{other} {_fmt(ratio)}")
    if parts:
        print(f"{'':<26}{', '.join(parts)}")


if __name__ == "__main__":
    sys.exit(main())
