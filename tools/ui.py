"""The web UI: one page (/) and its static files (/ui/<name>), from tools/web/ (package data).

    browser ── GET / , /ui/app.js ... ──▶ WebUi (static, no data, no token needed)
            ── fetch /search, /similar, /status, /items/{id}/thumbnail ... with "Authorization: Bearer" ──▶ API

The files hold no data and no secret, so they are served without the token, like /docs: the page has to
load before it can ask a person for the token. Everything it shows comes from the HTTP API, with the
token the person typed (kept in the tab's sessionStorage, sent as a header, never put in a URL).
The page says whether the server wants a token (`data-auth` on <html>), so it asks before its first call
instead of after a refusal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PAGE = "index.html"
_JS = "text/javascript; charset=utf-8"
ASSETS = {
    "app.js": _JS,  # the page: state and URL, search, grid, detail panel, filters, keys
    "api.js": _JS,  # the HTTP API: token, errors, pages of results
    "dom.js": _JS,  # building elements from text
    "thumbs.js": _JS,  # lazy thumbnails through blob: URLs
    "health.js": _JS,  # the status strip and the dead-letters view
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
ASSET_PREFIX = "/ui/"
PATHS = frozenset({"/", *(ASSET_PREFIX + name for name in ASSETS)})

# The page builds every element from API data with textContent, never innerHTML; the policy makes sure
# nothing else runs even if that slipped: only our own scripts, styles and connections, and images from
# this server or the blob: URLs of thumbnails fetched with the token.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str
    etag: str


class WebUi:
    """Serves the page and its files from memory (read once, at app start), with ETags so a browser
    revalidates them cheaply instead of downloading them again."""

    def __init__(self, *, token_required: bool) -> None:
        web = resources.files("tools") / "web"
        page = (web / PAGE).read_text(encoding="utf-8")
        page = page.replace('data-auth="none"', f'data-auth="{"bearer" if token_required else "none"}"', 1)
        self._files = {"/": _file(page.encode(), "text/html; charset=utf-8")}
        for name, media_type in ASSETS.items():
            self._files[ASSET_PREFIX + name] = _file((web / name).read_bytes(), media_type)

    def routes(self) -> list[Route]:
        return [
            Route("/", self.serve, methods=["GET"]),
            Route(ASSET_PREFIX + "{name}", self.serve, methods=["GET"]),
        ]

    async def serve(self, request: Request) -> Response:
        file = self._files.get(request.url.path)
        if file is None:
            raise HTTPException(404)
        headers = {"etag": file.etag, "cache-control": "no-cache", "x-content-type-options": "nosniff"}
        if file.media_type.startswith("text/html"):
            headers.update(_PAGE_HEADERS)
        if file.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.media_type, headers=headers)


def _file(body: bytes, media_type: str) -> _File:
    return _File(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
