"""``tokentrail serve --workers N``: N proxy processes on one port, for hosts where one core is the limit.

Why processes: the relay is one event loop, and one Python process uses one core (the benchmark in
``bench/`` shows the core saturated long before the network is). Each worker is a whole ``serve``
process — its own relay, writer thread and spool — so nothing new runs inside a worker; the
database already numbers records of one trajectory written by several processes correctly (SQLite
and PostgreSQL alike, see ``writer.py``).

How: every worker binds the port with ``SO_REUSEPORT``, so the kernel spreads new connections over
them by hash (one shared accepting socket would let whichever process wakes first take a whole burst).
Worker ``i`` keeps its spool at ``worker_spool_path(path, i)`` (``path``: the configured spool, which
every worker is given) and holds that spool's lock, so a restarted worker replays what its
predecessor spooled. This supervisor starts the workers, restarts one that dies, and on SIGTERM or
SIGINT passes SIGTERM on once (each worker then drains as a single ``serve`` does) and waits for
all of them. Workers run in their own session, so a Ctrl-C in a
terminal reaches them only through the supervisor, once: a second signal would make uvicorn skip the
drain.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from tokentrail.proxy.settings import Settings

if TYPE_CHECKING:
    from tokentrail.proxy.fleet.hub import ControlHub

logger = logging.getLogger(__name__)

# A worker that ends sooner than this after its start, this many times in a row, cannot run here (a
# port taken by another program, a spool held by another proxy): restarting it again would only
# fail again, so all stop. One quick death (killed by the OOM killer in a burst) is restarted.
QUICK_EXIT_S = 10.0
QUICK_EXITS_TO_GIVE_UP = 3
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkersError(RuntimeError):
    """Workers cannot be started with these settings."""


def worker_spool_path(path: Path, slot: int) -> Path:
    """Worker 0 keeps the configured spool (a single ``serve`` on the same settings replays it)."""
    return path if slot == 0 else path.with_name(f"{path.stem}.{slot}{path.suffix}")


def relay_spool_path(path: Path, slot: int) -> Path:
    """A relay's own spool when records go to the recorder process (which keeps ``path``): where
    they wait while the recorder cannot take them."""
    return path.with_name(f"{path.stem}.relay{slot}{path.suffix}")


def spool_of(settings: Settings, slot: int) -> Path:
    """The spool a proxy process (worker ``slot``) keeps, in either place records are written."""
    derive = relay_spool_path if settings.recorder == "process" else worker_spool_path
    return derive(settings.fallback_path, slot)


def stranded_spools(path: Path, workers: int, recorder: str = "thread") -> list[Path]:
    """Spools that still hold records and that nobody in this run replays, so they must be pointed
    out: those of worker slots this run does not start (an earlier run had more workers), and those
    of the other place records are written (``TOKENTRAIL_RECORDER`` changed since: a thread's spool
    ``<name>.N`` is nobody's under the recorder process, a relay's ``<name>.relayN`` nobody's without it)."""
    stranded = []
    for candidate in sorted(path.parent.glob(glob.escape(path.stem) + ".*")):
        slot = candidate.name.removeprefix(path.stem + ".").partition(".")[0]
        relay = slot.startswith("relay")
        number = slot.removeprefix("relay")
        if not number.isdigit():
            continue
        own_kind = relay == (recorder == "process")
        if own_kind and int(number) < workers:
            continue
        spool = (relay_spool_path if relay else worker_spool_path)(path, int(number)).name
        if candidate.name in (spool, spool + ".replaying") and candidate.stat().st_size > 0:
            stranded.append(candidate)  # (not its .lock, .refused or .health.json)
    return stranded


def listening_socket(host: str, port: int, *, shared: bool) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``shared`` lets the other workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def die_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel send this worker SIGTERM when its supervisor dies (Linux): a supervisor killed
    with SIGKILL cannot pass a signal on, and a worker left behind would hold the port and its spool.
    SIGTERM, so the worker still drains its calls first. (The supervisor may itself be PID 1 in a
    container, so its death is seen as a changed parent, not as a parent of 1.)"""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            logger.warning(
                "errno=<%d> | could not tie this worker's life to its supervisor", ctypes.get_errno()
            )
    if os.getppid() != supervisor_pid:  # the supervisor died before the kernel was told
        raise SystemExit(0)


def _check_port(settings: Settings) -> None:
    """Fail before any worker starts when the port is not free, with the reason, not N tracebacks."""
    if settings.port == 0:
        raise WorkersError("several workers need a fixed port (TOKENTRAIL_PORT / --port), not 0")
    try:
        listening_socket(settings.host, settings.port, shared=False).close()
    except OSError as exc:
        raise WorkersError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None


class Recorder(Protocol):
    """The host's recorder process as the supervisor sees it (``recorder/keeper.py``)."""

    path: Path

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


class Supervisor:
    """Starts ``settings.workers`` workers, restarts one that dies, stops them all on a signal."""

    def __init__(self, settings: Settings, recorder: Recorder | None = None) -> None:
        self.settings = settings
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # slot -> (process, start)
        self.stopping = False
        self.exit_code = 0
        self.quick_exits: dict[int, int] = {}  # slot -> quick exits in a row
        self.hub: ControlHub | None = None  # pause, resume and versions for all workers
        self.recorder = recorder  # TOKENTRAIL_RECORDER=process: the host's recorder, started first

    def _environment(self, slot: int) -> dict[str, str]:
        """The worker's settings: the supervisor's own (options included), its spool, one process."""
        settings = self.settings
        return {
            **os.environ,
            "TOKENTRAIL_UPSTREAM": settings.upstream,
            "TOKENTRAIL_DB": settings.db,
            "TOKENTRAIL_HOST": settings.host,
            "TOKENTRAIL_PORT": str(settings.port),
            "TOKENTRAIL_WORKERS": str(settings.workers),
            "TOKENTRAIL_FALLBACK_PATH": str(settings.fallback_path),  # the worker derives its own
        }

    def _start(self, slot: int) -> None:
        assert self.hub is not None
        command = [
            *(sys.executable, "-m", "tokentrail.proxy.cli", "serve"),
            *("--worker-slot", str(slot), "--supervisor-pid", str(os.getpid())),
            *("--fleet-socket", str(self.hub.path)),
            *(("--recorder-socket", str(self.recorder.path)) if self.recorder is not None else ()),
        ]
        process = subprocess.Popen(command, env=self._environment(slot), start_new_session=True)
        self.children[slot] = (process, time.monotonic())
        logger.info("worker=<%d>, pid=<%d> | worker started", slot, process.pid)
        if self.stopping:  # a signal came while it was being started: it missed the SIGTERM
            process.send_signal(signal.SIGTERM)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        logger.info("signal=<%s> | stopping %d workers", signal.Signals(signum).name, len(self.children))
        for process, _started in self.children.values():
            process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        _check_port(self.settings)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        from tokentrail.proxy.fleet.hub import ControlHub  # (only the supervisor needs it)

        self.hub = ControlHub(self.settings)
        self.hub.start()
        if self.recorder is not None:
            self.recorder.start()
        try:
            for slot in range(self.settings.workers):
                self._start(slot)
            while self.children:
                pid, status = os.wait()  # a signal runs _stop, then the wait goes on (PEP 475)
                self._reap(pid, os.waitstatus_to_exitcode(status))
        finally:
            if self.recorder is not None:  # last: the workers handed it everything as they drained
                self.recorder.stop(self.settings.graceful_shutdown_s)
            self.hub.stop()
        return self.exit_code

    def _reap(self, pid: int, code: int) -> None:
        slot = next((s for s, (p, _) in self.children.items() if p.pid == pid), None)
        if slot is None:
            return
        process, started = self.children.pop(slot)
        process.returncode = code  # reaped here: Popen must not wait for it again
        if self.stopping:
            if code not in (0, -signal.SIGTERM):
                self.exit_code = 1
            return
        quick = time.monotonic() - started < QUICK_EXIT_S
        self.quick_exits[slot] = self.quick_exits.get(slot, 0) + 1 if quick else 0
        if self.quick_exits[slot] >= QUICK_EXITS_TO_GIVE_UP:
            logger.error(
                "worker=<%d>, exit_code=<%d>, attempts=<%d> | worker cannot start; stopping all",
                slot,
                code,
                self.quick_exits[slot],
            )
            self.exit_code = 1
            self._stop(signal.SIGTERM, None)
            return
        logger.error("worker=<%d>, exit_code=<%d> | worker ended; starting a new one", slot, code)
        self._start(slot)


__all__ = [
    "Supervisor",
    "WorkersError",
    "die_with_supervisor",
    "listening_socket",
    "relay_spool_path",
    "spool_of",
    "stranded_spools",
    "worker_spool_path",
]
