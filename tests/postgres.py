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


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster; yield ``postgresql+psycopg://tokentrail@127.0.0.1:PORT``; stop and remove it."""
    root = tempfile.mkdtemp(prefix="tokentrail-pg-")
    data = os.path.join(root, "data")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    run = {"check": True, "capture_output": True}
    subprocess.run(
        _as_postgres([_bin("initdb"), "-D", data, "-U", "tokentrail", "--auth=trust", "-E", "UTF8"]), **run
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres(
            [_bin("pg_ctl"), "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "start"]
        ),
        **run,
    )
    try:
        yield f"postgresql+psycopg://tokentrail@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"]), check=False)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A fresh, empty database on the server; its SQLAlchemy URL."""
    name = "t_" + uuid.uuid4().hex[:12]
    dsn = server_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
