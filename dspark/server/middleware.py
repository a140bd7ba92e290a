"""Plain ASGI middlewares, outermost first: request context (id, access log, drain admission), API keys, body limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one wraps `receive`, and a handler behind it never
sees the client's disconnect, so a non-streaming request whose client went away would run to the end.
"""

from __future__ import annotations

import logging
import time
import uuid

from dspark.server.auth import authorized, needs_key
from dspark.server.protocol import error_response

access_log = logging.getLogger("dspark.access")
PROBES = ("/health", "/ready", "/metrics")


class Admission:
    """Whether new API requests are admitted, and how many are in flight; the drain on SIGTERM reads both."""

    def __init__(self, retry_after_s: int = 5):
        self.draining = False
        self.in_flight = 0
        self.retry_after_s = retry_after_s

    def start_drain(self) -> None:
        self.draining = True


class RequestContext:
    """Gives every request a new id (the response's X-Request-Id; completion and engine ids are built from it),
    counts /v1/ requests in flight, answers them 503 + Retry-After while draining, and writes one access-log line
    per request: method, path, status, duration, id. Never the body: no prompt text in logs."""

    def __init__(self, app, admission: Admission, on_reject=None):
        self.app, self.admission, self.on_reject = app, admission, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        api = scope["path"].startswith("/v1/")
        t0, status = time.perf_counter(), 499  # stays 499 if the client left before any response started

        async def send_with_id(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        if api and self.admission.draining:
            if self.on_reject:
                self.on_reject(scope["path"])
            await error_response(503, "server is shutting down; retry on another replica", "server_error",
                                 code="draining", headers={"Retry-After": str(self.admission.retry_after_s)})(
                scope, receive, send_with_id)
            return self._log(scope, rid, 503, t0)
        self.admission.in_flight += api
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            self.admission.in_flight -= api
            self._log(scope, rid, status, t0)

    @staticmethod
    def _log(scope, rid: str, status: int, t0: float) -> None:
        client = scope.get("client") or ("-", 0)
        level = logging.DEBUG if scope["path"] in PROBES else logging.INFO  # probes every few seconds: not news
        access_log.log(level, "%s %s %d", scope["method"], scope["path"], status,
                        extra={"request_id": rid, "method": scope["method"], "path": scope["path"],
                               "status": status, "duration_ms": round(1000 * (time.perf_counter() - t0), 1),
                               "client": client[0]})


class ApiKeyAuth:
    """`Authorization: Bearer <key>` on the API (and /metrics when protected); 401 in OpenAI's shape."""

    def __init__(self, app, keys: list[bytes], protect_metrics: bool, on_reject=None):
        self.app, self.keys, self.protect_metrics, self.on_reject = app, keys, protect_metrics, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and needs_key(scope["path"], self.protect_metrics):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not authorized(header or None, self.keys):
                if self.on_reject:
                    self.on_reject(scope["path"])
                return await error_response(401, "Incorrect or missing API key: send Authorization: Bearer <key>.",
                                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Reads the body first (whether or not the client sent a Content-Length), answers 413 past the limit, and
    replays the body to the app otherwise."""

    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes)
        chunks, size, more = [], 0, not too_big
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                too_big = True
                break
            chunks.append(chunk)
            more = msg.get("more_body", False)
        if too_big:
            if self.on_reject:
                self.on_reject(scope["path"])
            return await error_response(413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                        code="request_too_large", headers={"Connection": "close"})(scope, receive, send)
        data, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        return await self.app(scope, replay, send)
