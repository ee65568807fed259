"""The review page of `python -m app.clean`, a Starlette app only the person who started it can drive.

Like Jupyter's: a random token in the URL it prints, required by every API call and photo; the
`Host` header checked against the address it serves (a DNS-rebinding page cannot read the list);
the `Origin` of a request that changes something checked against that address too; and decisions
taken only as `application/json`, which a cross-site "simple" request cannot send.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import secrets
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from app.building.cli import UsageError
from app.building.ranking import Ranking
from app.building.review import Review, ReviewError
from app.core.images import decode_image
from app.web import (
    STATIC_DIR,
    ApiError,
    domain_error_handler,
    error_response,
    listen,
    on_api_error,
    on_http_exception,
)

THUMBNAIL_PX = 480  # the photo is the biggest thing on a card: up to 240 CSS px at 2x
STATUSES = {"bad_id": 400, "bad_action": 400, "not_a_class": 400, "same_folder": 400, "outside_data": 400,
            "no_such_photo": 404, "photo_gone": 409, "nothing_to_undo": 409}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The `Host` headers the page answers: its own loopback names; None (any) when it listens on
    another address, where the token alone guards it."""
    if not is_loopback(host):
        return None
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    return frozenset(f"{name}:{port}" for name in names) | frozenset(names)


class Guard:
    """Token, Host and Origin checks in front of the review app (see the module's docstring)."""

    def __init__(self, app: ASGIApp, token: str, hosts: frozenset[str] | None):
        self.app = app
        self.token = token
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        host = request.headers.get("host", "")
        if self.hosts is not None and host not in self.hosts:
            return await error_response(403, "bad_host", "This page only answers at the address it printed.")(
                scope, receive, send)
        if request.method != "GET":
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{scope.get('scheme', 'http')}://{host}":
                return await error_response(403, "cross_origin", "Requests from other sites are refused.")(
                    scope, receive, send)
        path = scope["path"]
        if not (path == "/" or path.startswith("/static/")):  # the page itself holds no data
            given = request.headers.get("x-review-token") or request.query_params.get("token") or ""
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                return await error_response(403, "bad_token", "Open the page with the link app.clean printed.")(
                    scope, receive, send)
        await self.app(scope, receive, send)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; only `application/json`, which no cross-site form can send."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "json_only", "Send decisions as application/json.")
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "Send a JSON object: {\"id\": N, \"action\": \"keep\"}.")
    return body


def create_review_app(data: Path, ranking: Ranking, token: str, host: str = "127.0.0.1",
                      port: int = 8001, incoming: Path | None = None) -> Starlette:
    review = Review(data, ranking, incoming)
    lock = asyncio.Lock()  # one decision at a time: each reads and changes the same folders

    @lru_cache(maxsize=4096)
    def thumbnail(path: str, mtime_ns: int) -> bytes:
        image = decode_image(Path(path).read_bytes(), draft_size=(2 * THUMBNAIL_PX, 2 * THUMBNAIL_PX))
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=82)
        return buffer.getvalue()

    def photo_path(request: Request) -> Path:
        item = review.item(request.path_params["id"])
        path = review.path_of(item.file)
        if not path.is_file():
            raise ApiError(404, "photo_gone", f"{item.file} is no longer in the data folder.")
        return path

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "clean.html")

    async def items(request: Request) -> JSONResponse:
        return JSONResponse({"classes": review.classes, "data": str(review.data),
                             "incoming": str(review.incoming) if review.incoming else None,
                             "items": [item.public() for item in review.items], "progress": review.progress()})

    async def thumb(request: Request) -> Response:
        path = photo_path(request)
        body = await asyncio.to_thread(thumbnail, str(path), path.stat().st_mtime_ns)
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    async def full(request: Request) -> Response:
        return FileResponse(photo_path(request))

    async def decide(request: Request) -> JSONResponse:
        body = await json_body(request)
        async with lock:
            item = review.item(body.get("id"))
            item = await asyncio.to_thread(review.decide, item, body.get("action"), body.get("to"))
        return JSONResponse({"item": item.public(), "progress": review.progress()})

    async def undo(request: Request) -> JSONResponse:
        async with lock:
            item = await asyncio.to_thread(review.undo)
        return JSONResponse({"item": item.public(), "progress": review.progress()})

    async def on_os_error(request: Request, exc: Exception) -> Response:
        return error_response(409, "file_error", f"The data folder could not be changed: {exc}")

    app = Starlette(routes=[
        Route("/", page),
        Route("/api/items", items),
        Route("/api/decide", decide, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/thumb/{id:int}", thumb),
        Route("/photo/{id:int}", full),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ], exception_handlers={ReviewError: domain_error_handler(STATUSES), ApiError: on_api_error,
                           HTTPException: on_http_exception, OSError: on_os_error})
    app.add_middleware(Guard, token=token, hosts=allowed_hosts(host, port))
    return app


def bind(host: str, port: int) -> socket.socket:
    """The page's listening socket, taken before anything is printed: a busy port is one line
    naming the option to change, and nobody is sent to another program's page."""
    try:
        return listen(host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port "
                         "(or --host)") from None


def serve(data: Path, ranking: Ranking, sock: socket.socket, incoming: Path | None = None) -> int:
    host, port = sock.getsockname()[:2]
    sock.listen(128)  # the printed link works at once
    token = secrets.token_urlsafe(24)
    app = create_review_app(data, ranking, token, host, port, incoming)
    shown = f"[{host}]" if ":" in host else host
    print(f"review the photos at http://{shown}:{port}/?token={token}  (Ctrl+C to stop; decisions are saved "
          "as you go)", flush=True)
    if not is_loopback(host):
        print(f"warning: listening on {host}, not only on this machine: anyone who can reach it and has the "
              "link can move your photos", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
