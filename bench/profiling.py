"""py-spy on a benchmarked process: sample it while the load runs, then its top costs per thread.

``record`` starts ``py-spy record --format raw --threads --function --full-filenames`` on a pid (py-spy
comes with the ``dev`` extra; it needs ptrace rights on the process: the same user, or root);
``top_costs`` reads the collapsed stacks back and lists, per thread (``MainThread`` is the event loop,
``tokentrail-writer`` the recording writer), the functions where the samples were (self) and the
functions under which they were (inclusive, each counted once per stack), as ``file:function`` with
the file relative to the package it belongs to. Idle samples (a thread waiting in epoll or on its
queue) are not recorded, so the shares are of the thread's busy time.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from tokentrail.proxy.recording.writer import THREAD_NAME as WRITER_THREAD

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):\d+\)$")
_SHORTEN = ("/tokentrail/", "/site-packages/", "/lib/python3")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def record(pid: int, out: Path, rate: int = 100) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` into ``out`` until ``stop``; None (and a note) without py-spy."""
    binary = py_spy()
    if binary is None:
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    command = [binary, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "--rate", str(rate)]
    command += ["--threads", "--function", "--full-filenames"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(process: subprocess.Popen[bytes]) -> str:
    """Stop sampling (py-spy writes its file on SIGINT); py-spy's complaints, if any."""
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return "" if process.returncode == 0 else err.decode(errors="replace").strip()[-500:]


def _short(path: str) -> str:
    for marker in _SHORTEN:
        if marker in path:
            tail = path.rsplit(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return path


def _frame(text: str) -> str:
    match = _FRAME.match(text)
    if match is None:
        return text
    return f"{_short(match['file'])}:{match['function']}"


@dataclass
class ThreadCosts:
    """Where one thread's busy samples were: (file:function, share of them), most first."""

    name: str
    samples: int
    own: list[tuple[str, float]]  # the function running
    inclusive: list[tuple[str, float]]  # the functions on the stack (entry frames left out)

    def as_dict(self) -> dict[str, object]:
        return {"thread": self.name, "samples": self.samples, "self": self.own, "inclusive": self.inclusive}


def top_costs(path: Path, top: int = 12) -> list[ThreadCosts]:
    """Each thread's costs in the raw py-spy file ``path``, the busiest thread first."""
    own: dict[str, Counter[str]] = {}
    under: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        thread, *frames = stack.split(";")
        name = thread.split(": ", 1)[-1]
        count = int(count_text)
        totals[name] += count
        if frames:
            functions = [_frame(f) for f in frames]
            own.setdefault(name, Counter())[functions[-1]] += count
            for function in set(functions):
                under.setdefault(name, Counter())[function] += count
    result = []
    for name, total in totals.most_common():
        inclusive = [(f, n / total) for f, n in under.get(name, Counter()).most_common() if n < 0.98 * total]
        result.append(
            ThreadCosts(
                name,
                total,
                [(f, n / total) for f, n in own.get(name, Counter()).most_common(top)],
                inclusive[:top],
            )
        )
    return result


def print_top_costs(
    costs: list[ThreadCosts], threads: tuple[str, ...] = ("MainThread", WRITER_THREAD)
) -> None:
    """The costs of ``threads`` (the event loop and the writer); the others' sample counts on one line
    (py-spy counts a thread waiting on a condition variable as busy now and then)."""
    others = [f"{t.name} {t.samples}" for t in costs if t.name not in threads]
    for thread in (t for t in costs if t.name in threads):
        print(f"\nprofile, thread {thread.name} ({thread.samples} busy samples): self | inclusive")
        for mine, under in zip_longest(thread.own, thread.inclusive):
            left = f"{mine[1]:6.1%} {mine[0]:<58.58}" if mine else " " * 65
            print(f"  {left} | " + (f"{under[1]:6.1%} {under[0]}" if under else ""))
    if others:
        print(f"other threads' samples: {', '.join(others)}")
