"""A small, reusable local web server on the standard library (no web framework).

Used by ``dd label serve`` (and meant for other local annotation pages, e.g. a preference
study). It gives:

* :class:`WebApp`: routes (``app.route("GET", r"/api/item/(\\d+)")``) to handler functions that
  take a :class:`Request` and return a :class:`Response`; static files from a folder
  (``app.static("/static/", folder)``) served only from inside that folder.
* :func:`serve` / :class:`LocalServer`: a ``ThreadingHTTPServer`` bound to ``127.0.0.1`` by
  default, runnable in the foreground or in a background thread (tests).
* Safety: path traversal in static paths is rejected (:func:`safe_join`); request bodies are
  size-capped; on a loopback address only ``Host`` headers naming a loopback host are
  accepted (blocks DNS-rebinding pages from talking to the server); responses carry
  ``X-Content-Type-Options: nosniff`` and API responses ``Cache-Control: no-store``.
* Beyond loopback (``--host 0.0.0.0`` for a team) every request needs a secret access token
  (:func:`make_tokens`): in the shared URL's ``?token=`` (the page then keeps it in an
  ``HttpOnly``, ``SameSite=Strict`` cookie), a ``dd_token`` cookie or an ``X-DD-Token``
  header, compared in constant time. A token minted for a name binds the requests made
  with it to that annotator (``request.annotator``); a shared token leaves the name to the
  page (``request.auth`` says which: ``loopback``, ``token`` or ``shared-token``).
* Files: :func:`atomic_write_png` (validated PNG bytes or a PIL image, written atomically);
  :class:`dd.runtime.io.JsonlLog` (re-exported here) appends whole JSON lines under a thread
  lock and an ``flock``, so two requests, or two server processes, never tear a line.

Handlers raise :class:`HTTPError` for client errors (turned into a JSON ``{"error": ...}``
response with that status); any other exception is a 500 with a one-line message.
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dd.runtime.io import JsonlLog, atomic_write_bytes, read_jsonl  # re-exported

__all__ = [
    "HTTPError",
    "JsonlLog",
    "LocalServer",
    "Request",
    "Response",
    "WebApp",
    "atomic_write_png",
    "read_jsonl",
    "safe_join",
    "serve",
]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
#: Default cap on request bodies (a mask PNG of a 4k image is well under this).
MAX_BODY = 64 * 1024 * 1024


class HTTPError(Exception):
    """A client error: ``status`` and a one-line ``message`` sent as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes = b""
    match: tuple[str, ...] = ()
    #: The annotator a named access token belongs to (None: loopback or a shared token).
    annotator: str | None = None
    #: How the request was let in: ``loopback``, ``token`` (named) or ``shared-token``.
    auth: str = "loopback"

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        vals = self.query.get(name)
        return vals[0] if vals else default

    def json(self) -> Any:
        """The body parsed as JSON (an :class:`HTTPError` 400 if it is not)."""
        try:
            return json.loads(self.body.decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError) as e:
            raise HTTPError(400, f"request body is not JSON: {e}") from None


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        data = json.dumps(obj, sort_keys=True).encode()
        return cls(data, status, "application/json", {"Cache-Control": "no-store"})

    @classmethod
    def file(cls, path: str | os.PathLike, content_type: str | None = None) -> Response:
        """A file's bytes (404 if missing); type guessed from the suffix."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise HTTPError(404, "not found") from None
        ctype = content_type or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        return cls(data, 200, ctype, {"Cache-Control": "no-store"})


def safe_join(root: str | os.PathLike, rel: str) -> Path | None:
    """``root / rel`` if it names a file inside ``root`` (symlinks resolved), else None.

    Rejects absolute paths, ``..`` segments, backslashes, NUL bytes and anything whose
    resolved location is outside ``root``.
    """
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    base = Path(root).resolve()
    target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        return None
    return target if target.is_file() else None


Handler = Callable[[Request], Response]


class WebApp:
    """Routes and static folders; build one, then :func:`serve` it."""

    def __init__(self, *, max_body: int = MAX_BODY):
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.statics: list[tuple[str, Path]] = []
        self.max_body = max_body

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        """Register a handler for ``method`` and a regex matched against the whole path; the
        regex groups arrive as ``request.match``."""

        def deco(fn: Handler) -> Handler:
            self.routes.append((method.upper(), re.compile(pattern + r"\Z"), fn))
            return fn

        return deco

    def static(self, prefix: str, folder: str | os.PathLike) -> None:
        """Serve files under ``folder`` at ``prefix`` + relative path (GET only)."""
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError("static prefix must start and end with '/'")
        self.statics.append((prefix, Path(folder)))

    def dispatch(self, req: Request) -> Response:
        allowed = set()
        for method, pattern, fn in self.routes:
            m = pattern.match(req.path)
            if m:
                if method != req.method:
                    allowed.add(method)
                    continue
                req.match = m.groups()
                return fn(req)
        if req.method == "GET":
            for prefix, folder in self.statics:
                if req.path.startswith(prefix):
                    target = safe_join(folder, req.path[len(prefix) :])
                    if target is None:
                        raise HTTPError(404, "not found")
                    return Response.file(target)
        if allowed:
            raise HTTPError(405, f"method {req.method} not allowed")
        raise HTTPError(404, "not found")


TOKEN_COOKIE = "dd_token"


def make_tokens(names: list[str] | None = None) -> dict[str, str | None]:
    """Fresh secret access tokens: one per annotator name, or one shared token (name None)."""
    import secrets

    if not names:
        return {secrets.token_urlsafe(24): None}
    return {secrets.token_urlsafe(24): name for name in dict.fromkeys(names)}


def _check_token(given: str, tokens: dict[str, str | None]) -> tuple[bool, str | None]:
    """``(ok, annotator)``; every token is compared (in constant time) whatever matches."""
    import hmac

    ok, who = False, None
    for token, name in tokens.items():
        if hmac.compare_digest(given.encode(), token.encode()):
            ok, who = True, name
    return ok, who


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""


def _handler_class(
    app: WebApp, loopback: bool, tokens: dict[str, str | None] | None = None
) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "dd-web"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet by default
            if os.environ.get("DD_WEB_LOG"):
                super().log_message(format, *args)

        def _send(self, resp: Response) -> None:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)

        def _handle(self) -> None:
            try:
                resp = self._respond()
            except HTTPError as e:
                resp = Response.json({"error": e.message}, e.status)
            except Exception as e:  # a bug must not kill the server; say what happened
                resp = Response.json({"error": f"{type(e).__name__}: {e}"}, 500)
            self._send(resp)

        def _respond(self) -> Response:
            if loopback and _host_name(self.headers.get("Host") or "") not in LOOPBACK_HOSTS:
                raise HTTPError(403, "forbidden host")
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            query = urllib.parse.parse_qs(url.query)
            auth, annotator, set_cookie = "loopback", None, ""
            if tokens:
                from_query = (query.get("token") or [""])[0]
                given = (
                    from_query
                    or self.headers.get("X-DD-Token")
                    or _cookie(self.headers.get("Cookie") or "", TOKEN_COOKIE)
                )
                ok, annotator = _check_token(given or "", tokens)
                if not ok:
                    self.close_connection = True
                    raise HTTPError(401, "missing or wrong access token: use the URL dd printed")
                auth = "token" if annotator is not None else "shared-token"
                if from_query:
                    set_cookie = f"{TOKEN_COOKIE}={from_query}; HttpOnly; SameSite=Strict; Path=/"
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0 or length > app.max_body:
                self.close_connection = True
                raise HTTPError(413, f"request body over {app.max_body} bytes")
            body = self.rfile.read(length) if length else b""
            req = Request(self.command, path, query, self.headers, body)
            req.annotator, req.auth = annotator, auth
            resp = app.dispatch(req)
            if set_cookie:
                resp.headers = {**resp.headers, "Set-Cookie": set_cookie}
            return resp

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def do_HEAD(self) -> None:
            self.command = "GET"
            try:
                resp = self._respond()
            except HTTPError as e:
                resp = Response.json({"error": e.message}, e.status)
            self.command = "HEAD"
            self._send(resp)

    return _Handler


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header (``127.0.0.1:8765`` -> ``127.0.0.1``, ``[::1]:80``
    -> ``[::1]``), lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.split(":", 1)[0]


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class LocalServer:
    """A ``ThreadingHTTPServer`` for ``app``; ``port=0`` picks a free port (see ``.url``).

    Bound beyond loopback it requires an access token on every request: ``tokens`` (from
    :func:`make_tokens`), or one shared token made here; :attr:`share_urls` are the URLs to
    hand out (one per annotator)."""

    def __init__(
        self,
        app: WebApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: dict[str, str | None] | None = None,
    ):
        loopback = is_loopback(host)
        self.tokens = None if loopback else (tokens or make_tokens())
        try:
            self.httpd = ThreadingHTTPServer(
                (host, port), _handler_class(app, loopback, self.tokens)
            )
        except OSError as e:
            from dd.errors import DDError

            raise DDError(
                f"cannot listen on {host}:{port}: {e.strerror or e}",
                hint="pick another --port (0 chooses a free one)",
            ) from None
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    @property
    def share_urls(self) -> list[tuple[str | None, str]]:
        """``(annotator, URL with its token)`` to hand out; ``[(None, url)]`` on loopback.
        A wildcard bind (``0.0.0.0``) is shown with this machine's host name."""
        if not self.tokens:
            return [(None, self.url)]
        import socket

        host = socket.gethostname() if self.host in ("0.0.0.0", "", "::") else self.host
        base = f"http://{host}:{self.port}/"
        return [(name, f"{base}?token={tok}") for tok, name in self.tokens.items()]

    def start(self) -> LocalServer:
        """Serve in a daemon thread (returns at once)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(
    app: WebApp,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    tokens: dict[str, str | None] | None = None,
) -> LocalServer:
    """Bind ``app`` (not started: call ``.serve_forever()`` or ``.start()``)."""
    return LocalServer(app, host, port, tokens=tokens)


# -- files -----------------------------------------------------------------------------------
def atomic_write_png(
    path: str | os.PathLike,
    image: Any,
    *,
    size: tuple[int, int] | None = None,
    mode: str | None = "L",
) -> Any:
    """Write a PNG atomically; returns the PIL image written.

    ``image`` is PNG bytes (checked to be a real PNG, :class:`HTTPError` 400 otherwise) or a
    PIL image. ``size`` = ``(width, height)`` it must have (400 otherwise); ``mode`` converts
    it (``"L"``: 8-bit grayscale; an RGBA upload becomes its luminance where opaque, 0 where
    transparent).
    """
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise HTTPError(400, "upload is not a PNG file")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if size is not None and im.size != tuple(size):
                    raise HTTPError(
                        400,
                        f"PNG is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}",
                    )
                im.load()
                image = im.copy()
        except HTTPError:
            raise
        except Exception as e:
            raise HTTPError(400, f"upload is not a readable PNG: {e}") from None
    if size is not None and image.size != tuple(size):
        raise HTTPError(
            400, f"PNG is {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}"
        )
    if mode is not None and image.mode != mode:
        if mode == "L" and image.mode in ("RGBA", "LA", "PA", "P"):
            rgba = image.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(black, rgba).convert("L")
        else:
            image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return image


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds (``2025-01-31T12:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
