"""Starts the recorder process, starts it again when it dies, stops it last.

One thread per keeper waits on the process (``Popen.wait``) and starts a new one when it ends
unexpectedly; the thread lives as long as the keeper because Linux sends the recorder its
parent-death signal when the *thread* that started it ends. A recorder that ends within
``QUICK_EXIT_S`` of its start ``QUICK_EXITS_TO_GIVE_UP`` times in a row cannot run here (its spool is
held by another proxy, the database URL is wrong): it is not started again, and the relays keep
their records in their own spools, counted and reported, until a restart of ``serve``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tokentrail.proxy.server.workers import QUICK_EXIT_S, QUICK_EXITS_TO_GIVE_UP  # a worker's rule

logger = logging.getLogger(__name__)

SOCKET_NAME = "recorder.sock"


class RecorderKeeper:
    """The recorder process of this host, and the socket the relays reach it on."""

    def __init__(self, environment: dict[str, str] | None = None) -> None:
        self.directory: Path | None = None
        self.path = Path()  # (set by start)
        self.environment = environment
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="tokentrail-recorder-keeper", daemon=True)

    def start(self) -> None:
        # A directory of its own, short (a Unix socket path is at most 107 bytes), owner-only; made
        # here, so that a supervisor that fails before it starts anything leaves nothing behind.
        self.directory = Path(tempfile.mkdtemp(prefix="tokentrail-recorder-"))
        self.path = self.directory / SOCKET_NAME
        self._thread.start()
        self._started.wait()

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [
            *(sys.executable, "-m", "tokentrail.proxy.recorder.main"),
            *("--socket", str(self.path), "--parent-pid", str(os.getpid())),
        ]
        process = subprocess.Popen(command, env=self.environment)
        logger.info("pid=<%d> | recorder started", process.pid)
        return process

    def _keep(self) -> None:
        quick_exits = 0
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                self.process = self._spawn()
            except OSError as exc:
                logger.error("error=<%s> | the recorder could not be started", exc.strerror)
                self._started.set()
                return
            self._started.set()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            quick_exits = quick_exits + 1 if time.monotonic() - began < QUICK_EXIT_S else 0
            if quick_exits >= QUICK_EXITS_TO_GIVE_UP:
                logger.error(
                    "exit_code=<%d>, attempts=<%d> | the recorder cannot start; records stay in the "
                    "relays' spools",
                    code,
                    quick_exits,
                )
                return
            logger.error("exit_code=<%d> | the recorder ended; starting a new one", code)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the recorder (it writes what it was handed, then exits) and wait for it."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("timeout_s=<%s> | the recorder did not stop in time; killed", timeout_s)
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self.directory is not None:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.directory.rmdir()
