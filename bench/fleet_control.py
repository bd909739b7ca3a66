"""What the fleet's control plane costs: a pause and a resume through TokenTrail, one process against
``serve --workers N`` (the supervisor's control plane, every worker told over its Unix socket).

    python bench/fleet_control.py                 # 1 and 3 workers, 20 pause/resume pairs each

A call pays nothing for it: the pause gate is each worker's own, set by the control plane, and read
on the request path as before. A pause or resume pays one round of commands to every worker and
waits for each to have done it; this prints the median and the slowest of each, beside the same
pair sent straight to the fake vLLM (what the upstreams' own routes cost).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from targets import TOKENTRAIL_SERVE, free_port, tokentrail_env, wait_http  # noqa: E402


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


def _line(name: str, pauses: list[float], resumes: list[float]) -> str:
    return (
        f"{name:22} pause {statistics.median(pauses):6.1f} ms (max {max(pauses):6.1f})   "
        f"resume {statistics.median(resumes):6.1f} ms (max {max(resumes):6.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--pairs", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokentrail-fleet-") as tmp_dir:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        # the tests' fake vLLM: it has the RL control plane (/pause, /resume, /weight_info)
        fake_app = ["-m", "uvicorn", "tests.fake_upstream:app", "--port", str(port), "--log-level", "warning"]
        fake = subprocess.Popen([sys.executable, *fake_app], cwd=BENCH.parent)
        try:
            wait_http(upstream + "/weight_info", fake)
            print(_line("vLLM's own routes", *_pairs(upstream, "/pause?mode=keep", "/resume", args.pairs)))
            for workers in args.workers:
                tmp = Path(tmp_dir) / f"w{workers}"
                tmp.mkdir()
                proxy_port = free_port()
                env = tokentrail_env(
                    upstream,
                    f"sqlite:///{tmp / 'db.sqlite'}",
                    proxy_port,
                    tmp,
                    TOKENTRAIL_WORKERS=str(workers),
                )
                process = subprocess.Popen(TOKENTRAIL_SERVE, env=env)
                try:
                    url = f"http://127.0.0.1:{proxy_port}"
                    wait_http(url + "/tokentrail/health", process)
                    pause, resume = "/tokentrail/v1/pause?mode=keep", "/tokentrail/v1/resume"
                    print(_line(f"TokenTrail, {workers} worker(s)", *_pairs(url, pause, resume, args.pairs)))
                finally:
                    process.terminate()
                    process.wait(60)
        finally:
            fake.terminate()
            fake.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
