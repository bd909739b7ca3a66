"""Capture the wire samples the tests replay: every request of ``requests.json``, sent to a real vLLM.

Usage (the CPU kit in ``deploy/vllm-cpu/``; any running vLLM that serves the tiny model works)::

    bash deploy/vllm-cpu/start.sh /tmp/tiny            # prints BASE_URL=http://127.0.0.1:8001/v1
    python3 tests/vllm_samples/capture.py http://127.0.0.1:8001
    PORT=8001 bash deploy/vllm-cpu/stop.sh

Each sample is written next to this script as ``<name>.txt``::

    ### REQUEST <METHOD> <PATH>
    <request body: JSON indented by 2, or the raw text for malformed-body samples>
    ### RESPONSE <status> content-type: <content type> (<milliseconds> ms)
    <the response body, byte for byte>

Why a script rather than hand-written fixtures: the fake upstream and the capture tests must speak
exactly what vLLM speaks (field order, compact JSON, SSE framing, error texts), and vLLM changes that
between releases. Rerun this after a vLLM upgrade and review the diff. Standard library only, so it
runs with any Python 3.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent


def request_body(spec: dict[str, Any]) -> bytes:
    """The bytes a sample sends: its JSON indented as the sample file shows it, or its raw text."""
    if "json" in spec:
        return json.dumps(spec["json"], indent=2).encode()
    return str(spec.get("raw", "")).encode()


def capture_one(base_url: str, spec: dict[str, Any], timeout_s: float) -> bytes:
    """Send one sample request and return the sample file's bytes."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    body = request_body(spec)
    headers = {"content-type": "application/json"} if body else {}
    started = time.monotonic()
    try:
        connection.request(spec["method"], spec["path"], body=body or None, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    elapsed_ms = round((time.monotonic() - started) * 1000)
    head = f"### REQUEST {spec['method']} {spec['path']}\n".encode()
    if body:
        head += body + b"\n"
    content_type = response.getheader("content-type")
    head += f"### RESPONSE {response.status} content-type: {content_type} ({elapsed_ms} ms)\n".encode()
    return head + payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", help="vLLM's base URL without /v1, e.g. http://127.0.0.1:8001")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the <name>.txt files")
    parser.add_argument("--only", action="append", default=[], help="capture only these sample names")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    specs = json.loads((HERE / "requests.json").read_text())
    for spec in specs:
        if args.only and spec["name"] not in args.only:
            continue
        sample = capture_one(base_url, spec, args.timeout)
        (args.out / f"{spec['name']}.txt").write_bytes(sample)
        print(spec["name"], sample.split(b"\n### RESPONSE ", 1)[-1].split(b" ", 1)[0].decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
