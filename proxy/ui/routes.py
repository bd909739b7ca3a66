"""``/tokentrail/ui/``: the viewer's three files, served as they are.

The files hold no data: the page asks ``/tokentrail/v1/`` for it with the key the user types (so the
API-key rule is the API's own). A content security policy keeps the page to this origin, so nothing is
fetched from elsewhere even by mistake.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent / "static"
FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version is seen at once
}

router = APIRouter(prefix="/tokentrail", include_in_schema=False)


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/tokentrail/ui/", status_code=308)


@router.get("/ui/")
def ui_index() -> FileResponse:
    return ui_file("")


@router.get("/ui/{name}")
def ui_file(name: str) -> FileResponse:
    """One of the viewer's files (a fixed set: no path from the request reaches the file system)."""
    found = FILES.get(name)
    if found is None:
        raise HTTPException(404, "no such file in the viewer")
    filename, media_type = found
    return FileResponse(STATIC / filename, media_type=media_type, headers=HEADERS)
