"""A real PostgreSQL for the tests: Debian's package, a throwaway cluster on a free port.

``.ci/run`` installs the ``postgresql`` package; the cluster lives in a temporary directory, runs as
the ``postgres`` user when the tests run as root (PostgreSQL refuses root), and is stopped at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.servers import free_socket


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (as .ci/run does)")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresCluster:
    """A throwaway cluster that a test can also stop and start again (a database outage)."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="tokentrail-pg-")
        self.data = os.path.join(self.root, "data")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"postgresql+psycopg://tokentrail@127.0.0.1:{self.port}"
        subprocess.run(
            _as_postgres([_bin("initdb"), "-D", self.data, "-U", "tokentrail", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.root, "log")
        subprocess.run(
            _as_postgres([_bin("pg_ctl"), "-D", self.data, "-o", options, "-l", log, "-w", "start"]),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A started cluster; stopped and removed afterwards."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster; yield ``postgresql+psycopg://tokentrail@127.0.0.1:PORT``; stop and remove it."""
    with postgres_cluster() as cluster:
        yield cluster.url


def create_database(server_url: str) -> str:
    """A fresh, empty database on the server; its SQLAlchemy URL."""
    name = "t_" + uuid.uuid4().hex[:12]
    dsn = server_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
