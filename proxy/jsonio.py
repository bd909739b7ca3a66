"""JSON on the hot path: orjson where it can, the standard library where orjson refuses.

Why: the relay parses every request and every stream chunk, and the writer serialises every record;
orjson does both several times faster than ``json`` and holds the GIL for less time, which matters
because the writer thread shares it with the event loop. orjson refuses a few things the standard
library accepts (``NaN``/``Infinity`` literals, lone surrogates): those inputs fall back to ``json``,
so a body is never judged invalid JSON here when vLLM (which uses the standard library) would take it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ``ValueError`` (or ``UnicodeDecodeError``) like ``json.loads``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps_text(value: Any) -> str:
    """Serialise for a JSON column (SQLAlchemy's ``json_serializer`` wants ``str``)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # a value orjson cannot take (an int beyond 64 bits, a NaN is fine): stdlib
        return json.dumps(value, ensure_ascii=False)
