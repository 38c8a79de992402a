"""The web chat page at `/`: one self-contained HTML file (no build step, no CDN), served to
browsers; other clients asking for `/` still get Ollama's "Ollama is running".

The page talks to this server's own /v1 API (same origin, so the request guard lets it through):
model picker from /v1/models, streamed replies rendered as markdown with code blocks, thinking
folded, a stop button (aborting the fetch aborts the generation), tokens/s after each reply, and
an API key field when the server requires one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse

_PAGE = Path(__file__).with_name("static") / "chat.html"


@lru_cache(maxsize=1)
def _template() -> str:
    return _PAGE.read_text(encoding="utf-8")


def wants_page(request: Request) -> bool:
    """Browsers navigating to `/` accept text/html; API clients and health probes do not."""
    return "text/html" in request.headers.get("accept", "")


def page_response(service) -> HTMLResponse:
    config = {"needsKey": bool(service.settings.api_key), "title": service.names()[0]}
    html = _template().replace("/*KTRANS_CONFIG*/{}", json.dumps(config))
    # The page's own script and style are inline; nothing may load from elsewhere.
    csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})
