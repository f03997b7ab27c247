"""The status page at `/ui`: plain HTML, CSS and JavaScript shipped in this package (no build
step, nothing fetched from elsewhere), served as they are.

The page holds no data: it reads `GET /admin/status`, `GET /admin/events/stream` and
`GET /admin/requests/{id}` and posts the drain and enable actions, all with the admin key
(when one is configured) as a Bearer token, which the page asks for once and keeps in the
browser's sessionStorage (gone when the tab closes). So the page itself is served without
a key, and everything it shows is behind the admin key like the rest of /admin.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

#: The files of the page: name -> content type.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: Nothing but this origin's own files and API; no inline script, no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

UI_FILES = web.AppKey("ui_files", dict)


def _load() -> dict[str, bytes]:
    root = resources.files(__name__)
    return {name: root.joinpath(name).read_bytes() for name in FILES}


async def _serve(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    if name not in FILES:
        raise web.HTTPNotFound()  # answered as any unknown path is (proxy.app)
    return web.Response(body=request.app[UI_FILES][name],
                        headers={**_HEADERS, "Content-Type": FILES[name]})


async def _home(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui")


def add_ui_routes(app: web.Application) -> None:
    """Register `/ui` (the page), `/ui/{name}` (its script and style sheet) and `/` (a
    redirect to the page). The files are read once, here."""
    app[UI_FILES] = _load()
    app.router.add_get("/ui", _serve)
    app.router.add_get("/ui/{name}", _serve)
    app.router.add_get("/", _home)
