"""Deliberate bugs on the recording path, each of which the test suite must catch.

Why: a suite can be green and still miss the bug it claims to guard against (an audit found six such
tests). Each mutation below is one plausible bug, written as an exact text replacement in one file;
the script applies it, runs the tests named for it (without the real vLLM, so a run takes minutes),
restores the file, and reports whether the tests failed (caught) or passed (missed). Run it after
changing the recording path or its tests; a missed mutation is a test to write.

    .venv/bin/python bench/mutations.py            # all of them
    .venv/bin/python bench/mutations.py --list     # names only
    .venv/bin/python bench/mutations.py strip-stream replay-duplicates

It edits files of the working tree in place (the strict editable install imports them from there) and
restores each in ``finally``; it refuses to touch a file with uncommitted changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTATIONS = [
    Mutation(
        "integrity-always-ok",
        "proxy/recording/capture.py",
        'return ",".join(found) if found else Integrity.OK',
        "return Integrity.OK",
        ("tests/test_capture.py",),
        "every record judged ok, whatever vLLM's usage says",
    ),
    Mutation(
        "completion-count-unchecked",
        "proxy/recording/capture.py",
        "if generated != record.completion_tokens:",
        "if False:",
        ("tests/test_capture.py",),
        "generated IDs that do not match usage.completion_tokens pass",
    ),
    Mutation(
        "logprobs-dropped",
        "proxy/recording/capture.py",
        "            choice.logprobs.extend(entries)",
        "            pass",
        ("tests/test_capture.py",),
        "logprobs are not kept",
    ),
    Mutation(
        "strip-stream",
        "proxy/relay/asgi.py",
        "StreamTap(capture, strip)",
        "StreamTap(capture, False)",
        (
            "tests/test_relay_fake.py::test_a_client_that_did_not_ask_for_token_ids_gets_the_bytes_vllm_sends_without_the_flag",
        ),
        "a stream keeps the token IDs the client did not ask for",
    ),
    Mutation(
        "strip-body",
        "proxy/relay/asgi.py",
        "body = strip_token_ids(body)",
        "body = body",
        (
            "tests/test_relay_fake.py::test_a_client_that_did_not_ask_for_token_ids_gets_the_bytes_vllm_sends_without_the_flag",
        ),
        "a JSON answer keeps the token IDs the client did not ask for",
    ),
    Mutation(
        "backpressure-ignored",
        "proxy/server/uvicorn_hooks.py",
        "        return not self._flow.write_paused",
        "        return True",
        (
            "tests/test_relay_fake.py::test_a_slow_stream_reader_pauses_the_upstream_and_still_gets_every_byte",
        ),
        "the relay never pauses the upstream for a slow client",
    ),
    Mutation(
        "replay-duplicates",
        "proxy/recording/writer.py",
        "todo = [(record, line) for record, line in chunk if record.call_id not in present]",
        "todo = [(record, line) for record, line in chunk]",
        ("tests/test_writer.py", "tests/test_outage.py"),
        "a replay writes calls the database already holds again",
    ),
    Mutation(
        "queue-full-drops",
        "proxy/recording/writer.py",
        '            self._spill([record], "queue_full")',
        "            pass",
        ("tests/test_writer.py",),
        "a record that finds the queue full is dropped silently",
    ),
    Mutation(
        "ordinal-stuck",
        "proxy/recording/writer.py",
        "            self._ordinals[trajectory_id] = ordinal + 1",
        "            self._ordinals[trajectory_id] = ordinal",
        (
            "tests/test_relay_fake.py::test_200_concurrent_calls_over_20_trajectories_give_200_rows_and_gapless_seq",
        ),
        "concurrent calls of a trajectory get the same arrival ordinal",
    ),
    Mutation(
        "spool-ignores-limit",
        "proxy/recording/spool.py",
        "            if self._bytes + len(data) > self.max_bytes:",
        "            if False:",
        ("tests/test_outage.py",),
        "the spool grows past TOKENTRAIL_SPOOL_MAX_BYTES",
    ),
]


def run(mutation: Mutation) -> tuple[str, float]:
    """Apply ``mutation``, run its tests, restore the file; 'caught', 'MISSED' or an error word."""
    path = ROOT / mutation.path
    if subprocess.run(["git", "diff", "--quiet", "--", mutation.path], cwd=ROOT, check=False).returncode:
        return "skipped: file has uncommitted changes", 0.0
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        return "stale: the code to mutate is not there once", 0.0
    started = time.monotonic()
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "not vllm",
                *mutation.tests,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        path.write_bytes(original)
    verdict = {0: "MISSED", 1: "caught"}.get(done.returncode, f"error (pytest exit {done.returncode})")
    return verdict, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list or not chosen:
        for mutation in MUTATIONS:
            print(f"{mutation.name:28} {mutation.path:32} {mutation.what}")
        return 0 if args.list else 2
    missed = 0
    for mutation in chosen:
        verdict, seconds = run(mutation)
        missed += verdict != "caught"
        print(f"{mutation.name:28} {verdict:8} {seconds:6.1f} s  {mutation.what}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
