"""The ASGI application: find the route, check the token, run the handler, answer.

Order of checks: the route (404/405), then the token (401) before anything about the request is looked
at, then the namespace (400) and whether the token may use it (403), then the handler.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import Internal, InvalidInput, NotFound, ShoalError
from shared.tokens import Unauthorized
from shared.validation import check_namespace

from .handlers import HANDLERS
from .http import Receive, Request, Response, Scope, Send, error_response
from .routes import ROUTES, Route

if TYPE_CHECKING:
    from .service import GatewayService

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
# The dashboard talks only to this origin and runs no inline script.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


class MethodNotAllowed(ShoalError):
    default_code = 405


def match(routes: tuple[Route, ...], segments: list[str], method: str) -> tuple[Route, dict[str, str]]:
    """The route of a path and method, with its path parameters; 404 or 405 otherwise."""
    allowed: list[str] = []
    for route in routes:
        template = route.segments
        if len(template) != len(segments):
            continue
        params: dict[str, str] = {}
        for part, seg in zip(template, segments):
            if part.startswith("{"):
                if not seg:
                    break
                params[part[1:-1]] = seg
            elif part != seg:
                break
        else:
            if route.method == method:
                return route, params
            allowed.append(route.method)
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed here; allowed: {', '.join(sorted(set(allowed)))}")
    raise NotFound("no such route; see /openapi.json")


def static_files() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files, read once: served by exact name only, so no path can reach another file."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            files[path.name] = (path.read_bytes(), kind)
    return files


class GatewayApp:
    def __init__(self, gw: GatewayService) -> None:
        self.gw = gw
        self.static = static_files()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            req = Request(scope, receive)
        except (ShoalError, UnicodeDecodeError, ValueError) as exc:
            error = exc if isinstance(exc, ShoalError) else InvalidInput(f"undecodable request line: {exc}")
            await error_response(error).send(send)
            return
        static = self._static(req)
        if static is not None:
            await static.send(send)
            return
        try:
            result = await self._handle(req)
        except ShoalError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="shoal"'} if isinstance(exc, Unauthorized) else {}
            if isinstance(exc, MethodNotAllowed):
                headers["Allow"] = exc.message.rsplit(": ", 1)[-1]
            await error_response(exc, headers).send(send)
            return
        except Exception:
            log.exception("%s %s failed", req.method, req.path)
            await error_response(Internal("internal error; see the gateway log")).send(send)
            return
        if isinstance(result, Response):
            await result.send(send)
        else:
            await result.run(send, req)

    async def _handle(self, req: Request):  # -> Response | JobEvents
        route, req.params = match(ROUTES, req.segments, req.method)
        access = self.gw.tokens.check(req.header("authorization")) if route.access != "public" else None
        if "ns" in req.params:
            check_namespace(req.params["ns"], "ns")  # named as the path parameter `{ns}`
        if access is not None:
            if route.access == "admin":
                access.admin()
            elif "ns" in req.params:
                access.namespace(req.params["ns"])
            req.access = access
        return await HANDLERS[route.handler](self.gw, route, req)

    def _static(self, req: Request) -> Response | None:
        """The dashboard: `/` is its page, `/static/<name>` its script and style."""
        if req.path == "/":
            name = "index.html"
        elif req.path.startswith(STATIC_PREFIX):
            name = req.path[len(STATIC_PREFIX):]
        else:
            return None
        found = self.static.get(name)
        if found is None:
            return error_response(NotFound("no such file"))
        if req.method != "GET":
            return error_response(MethodNotAllowed("only GET is allowed here; allowed: GET"), {"Allow": "GET"})
        body, kind = found
        return Response(200, body, content_type=kind, headers={"Content-Security-Policy": CSP,
                                                               "Cache-Control": "no-cache"})
