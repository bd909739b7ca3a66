"""The wheel carries every package, the migrations and the type markers, and imports from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tokentrail.proxy.storage.migrate import head_revision

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_its_migrations_from_another_folder(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tokentrail-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "tokentrail/proxy/relay/asgi.py",
        "tokentrail/proxy/py.typed",
        "tokentrail/proxy/storage/models.py",
        "tokentrail/proxy/api/health.py",
        "tokentrail/proxy/metrics/catalog.py",
        "tokentrail/proxy/ui/static/index.html",  # the viewer ships inside the package
        "tokentrail/proxy/ui/static/viewer.js",
        "tokentrail/proxy/ui/static/viewer.css",
        "tokentrail/migrations/env.py",
        "tokentrail/migrations/script.py.mako",
        "tokentrail/migrations/versions/0001_initial.py",
    ):
        assert expected in names
    assert not any(n.startswith(("proxy/", "tests/", "migrations/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    check = subprocess.run(
        [sys.executable, "-c", "import tokentrail.proxy.app as m; print(m.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.startswith(str(target))
    upgrade = subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", "db", "upgrade", "--db", "sqlite:///w.db"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"to {head_revision('sqlite://')}" in upgrade.stdout  # every migration shipped in the wheel


def test_bare_proxy_package_is_not_importable() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import proxy"], cwd="/", capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
