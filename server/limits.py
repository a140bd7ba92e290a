"""Request body size limit as a plain ASGI middleware: it reads the body first (whether or not the client sent a
Content-Length), answers 413 in OpenAI's shape past the limit, and replays the body to the app otherwise."""

from __future__ import annotations

import json


class BodyLimit:
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
            body = json.dumps({"error": {"message": f"request body exceeds the limit of {self.max_bytes} bytes",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "request_too_large"}}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        data, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        return await self.app(scope, replay, send)
