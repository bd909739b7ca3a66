"""What the side-by-side benchmarks share: starting the fake vLLM, nginx, the naive passthrough and
``tokentrail serve`` pinned to cores, waiting for them, and reading their figures from ``/proc``.

``bench/run.py`` (independent calls) and ``bench/agents.py`` (agent-shaped load) measure the same
targets the same way: every proxy under test on ``--proxy-core``, the fake upstream and the load
generator on ``--other-core``, so a proxy can never borrow the load generator's CPU; ``soak.py``,
``crash.py`` and ``token_in_check.py`` start the fake and TokenTrail with the same helpers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from tokentrail.proxy.recording.writer import THREAD_NAME as WRITER_THREAD

BENCH = Path(__file__).resolve().parent
FAKE_VLLM = [sys.executable, str(BENCH / "fake_vllm.py"), "--port"]
TOKENTRAIL_SERVE = [sys.executable, "-m", "tokentrail.proxy.cli", "serve"]
# The recording writer's thread as the kernel names it (``/proc/<pid>/task/*/comm``: 15 characters).
WRITER_THREAD_COMM = WRITER_THREAD[:15]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args!r} exited during startup")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer")


@contextmanager
def serve_tokentrail(upstream: str, db_url: str, tmp: Path, **settings: str) -> Iterator[tuple[str, int]]:
    """``tokentrail serve`` (its spool in ``tmp``, made here) until the block ends: its URL and pid."""
    port = free_port()
    tmp.mkdir(parents=True)
    process = subprocess.Popen(TOKENTRAIL_SERVE, env=tokentrail_env(upstream, db_url, port, tmp, **settings))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/tokentrail/health", process)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(60)


def throwaway_postgres(stack: ExitStack) -> str:
    """The tests' throwaway PostgreSQL cluster (``tests/postgres.py``), stopped with ``stack``: its
    server's URL, for ``fresh_postgres_database``."""
    from tests.postgres import postgres_server  # (imported here: SQLite-only runs need none of it)

    return stack.enter_context(postgres_server())


def fresh_postgres_database(server: str) -> str:
    """A new, empty database on ``server``: its URL."""
    from tests.postgres import create_database

    return create_database(server)


def tests_fake_upstream(stack: ExitStack) -> str:
    """The tests' fake vLLM (it has the RL control plane: /pause, /resume, /weight_info), stopped with
    ``stack``: its URL."""
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    app = ["-m", "uvicorn", "tests.fake_upstream:app", "--port", str(port), "--log-level", "warning"]
    fake = subprocess.Popen([sys.executable, *app], cwd=BENCH.parent)
    stack.callback(fake.wait, 30)
    stack.callback(fake.terminate)
    wait_http(upstream + "/weight_info", fake)
    return upstream


def tokentrail_env(upstream: str, db_url: str, port: int, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked ``tokentrail serve``: quiet, its spool in ``tmp``."""
    return dict(
        os.environ,
        TOKENTRAIL_UPSTREAM=upstream,
        TOKENTRAIL_DB=db_url,
        TOKENTRAIL_PORT=str(port),
        TOKENTRAIL_LOG_LEVEL="warning",
        TOKENTRAIL_FALLBACK_PATH=str(tmp / "fallback.jsonl"),
        **extra,
    )


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (the recorder process is started by a thread of its
    own, and ``/proc/<pid>/task/<pid>/children`` lists only the main thread's)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return children


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (the workers, under ``--workers``)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for child in _children(pid):
        total += rss_mib(child)
    return total


def _stat_cpu_s(stat_path: Path) -> float:
    """utime + stime of a ``/proc/.../stat`` file, in seconds."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15 of proc(5)


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by ``pid`` (all its threads) and its children (nginx's or TokenTrail's
    workers)."""
    try:
        own = _stat_cpu_s(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0
    return own + sum(cpu_seconds(child) for child in _children(pid))


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s main thread alone: a proxy's event loop, without its writer thread or
    any process it started (the recorder)."""
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/task/{pid}/stat"))
    except OSError:
        return 0.0


def thread_cpu_seconds(pid: int, comm: str) -> float | None:
    """CPU time used so far by the threads named ``comm`` of ``pid`` and its children; None when
    there is none."""
    total = None
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == comm:
                total = (total or 0.0) + _stat_cpu_s(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
    for child in _children(pid):
        more = thread_cpu_seconds(child, comm)
        if more is not None:
            total = (total or 0.0) + more
    return total


def pinned(cores: str, command: list[str], no_pin: bool) -> list[str]:
    """``command`` run on ``cores`` (a taskset list), unless pinning is off or taskset is missing."""
    if no_pin or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", cores, *command]


def add_target_options(parser: argparse.ArgumentParser, targets: str) -> None:
    """The options that say what runs where, as ``Targets`` reads them."""
    parser.add_argument(
        "--targets",
        default=targets,
        help=f"comma-separated, of: {targets}, recorder (TokenTrail with TOKENTRAIL_RECORDER=process)",
    )
    parser.add_argument("--proxy-core", default="0", help="core(s) of the proxy under test (taskset list)")
    parser.add_argument("--other-core", default="1", help="core(s) of the upstream and load generator")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="TokenTrail's and nginx's worker processes (one per proxy core)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")


_NGINX_CONF = """
worker_processes {workers};
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 100m;
    keepalive_requests 1000000;
    upstream vllm {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://vllm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class Targets:
    """Starts and stops the upstream and every proxy under test.

    ``fake_options`` are passed to the fake vLLM; ``tokentrail_extra_env`` to every TokenTrail.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        tmp: Path,
        *,
        fake_options: list[str] | None = None,
        tokentrail_extra_env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.tmp = tmp
        self.fake_options = fake_options or []
        self.tokentrail_extra_env = tokentrail_extra_env or {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.urls: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.db_url = f"sqlite:///{tmp / 'bench.db'}"
        self.recorder_db_url = ""
        self.tokentrail_pid = 0
        self.tokentrail_process: subprocess.Popen[bytes] | None = None
        self.upstream = ""

    def _pinned(self, cores: str, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(pinned(cores, command, self.args.no_pin), **kwargs)
        self.processes.append(process)
        return process

    def start(self) -> None:
        args = self.args
        if getattr(args, "upstream", None):
            self.upstream = args.upstream.rstrip("/").removesuffix("/v1")
        else:
            port = free_port()
            self.upstream = f"http://127.0.0.1:{port}"
            process = self._pinned(args.other_core, [*FAKE_VLLM, str(port), *self.fake_options])
            wait_http(self.upstream + "/health", process)
            self.pids["direct"] = process.pid
        self.urls["direct"] = self.upstream
        wanted = args.targets.split(",")
        if "nginx" in wanted and not getattr(args, "upstream", None):
            self._start_nginx()
        if "naive" in wanted and not getattr(args, "upstream", None):
            self._start_naive()
        if "tokentrail" in wanted:
            self.urls["tokentrail"], process = self.start_tokentrail(self.db_url)
            self.tokentrail_pid = self.pids["tokentrail"] = process.pid
            self.tokentrail_process = process
        if "recorder" in wanted:  # TokenTrail with its recorder process, on a database of its own
            folder = self.tmp / "recorder"
            folder.mkdir()
            self.recorder_db_url = f"sqlite:///{folder / 'bench.db'}"
            self.urls["recorder"], process = self.start_tokentrail(
                self.recorder_db_url, folder, TOKENTRAIL_RECORDER="process"
            )
            self.pids["recorder"] = process.pid

    def _start_nginx(self) -> None:
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx is None:
            print("nginx not found (apt install nginx-light): leaving it out", file=sys.stderr)
            return
        port = free_port()
        conf = self.tmp / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            _NGINX_CONF.format(
                tmp=self.tmp,
                port=port,
                upstream=self.upstream.removeprefix("http://"),
                user=user,
                workers=self.args.workers,
            )
        )
        process = self._pinned(
            self.args.proxy_core, [nginx, "-c", str(conf), "-p", str(self.tmp), "-g", "daemon off;"]
        )
        self.urls["nginx"] = f"http://127.0.0.1:{port}"
        wait_http(self.urls["nginx"] + "/health", process)
        self.pids["nginx"] = process.pid

    def _start_naive(self) -> None:
        port = free_port()
        process = self._pinned(
            self.args.proxy_core,
            [
                sys.executable,
                "-m",
                "uvicorn",
                "naive_proxy:app",
                "--app-dir",
                str(BENCH),
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=dict(os.environ, NAIVE_UPSTREAM=self.upstream),
        )
        self.urls["naive"] = f"http://127.0.0.1:{port}"
        wait_http(self.urls["naive"] + "/health", process)
        self.pids["naive"] = process.pid

    def start_tokentrail(
        self, db_url: str, spool_dir: Path | None = None, **settings: str
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """One more ``tokentrail serve`` on the proxy core, recording to ``db_url``, its spool in
        ``spool_dir`` (default: ``tmp``), with ``settings`` (``TOKENTRAIL_*``): its URL and process."""
        port = free_port()
        env = tokentrail_env(
            self.upstream,
            db_url,
            port,
            spool_dir or self.tmp,
            TOKENTRAIL_WORKERS=str(self.args.workers),
            **{**self.tokentrail_extra_env, **settings},
        )
        process = self._pinned(self.args.proxy_core, TOKENTRAIL_SERVE, env=env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/tokentrail/health", process)
        return url, process

    def stop_one(self, process: subprocess.Popen[bytes]) -> None:
        """Stop one process (SIGTERM: TokenTrail drains its writer first)."""
        process.terminate()
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
        if process in self.processes:
            self.processes.remove(process)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_written(db_url: str, spool_dir: Path, expected: int, limit_s: float = 120) -> dict[str, Any]:
    """Records in the database and in the spools (every worker's), once they add up to ``expected``.

    Counted there rather than from ``/tokentrail/health``, which answers for one worker only."""
    deadline = time.monotonic() + limit_s
    engine = create_engine(db_url)
    try:
        while True:
            with engine.connect() as connection:
                written = connection.execute(text("SELECT count(*) FROM llm_calls")).scalar_one()
            failed = sum(
                len(path.read_bytes().splitlines())
                for path in spool_dir.glob("fallback*.jsonl*")
                if path.name.endswith((".jsonl", ".replaying", ".refused"))
            )
            if written + failed >= expected or time.monotonic() > deadline:
                return {"records_written": written, "records_failed": failed}
            time.sleep(0.1)
    finally:
        engine.dispose()
