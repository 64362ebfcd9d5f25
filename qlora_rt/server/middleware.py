"""What every request passes before a route sees it, as plain ASGI (so a body is counted as it arrives):

- `Guard`: the Host header (a server bound to this machine answers only to this machine's names: a page on
  another site that rebinds its DNS to 127.0.0.1 is refused), the API key (every path but /health: the
  OpenAPI schema and its pages too), and the body's size (--max-body; a chunked body is counted as it
  arrives and refused at the limit, never read whole). The body is read here and handed to the route in
  one piece; after it the client's disconnect still reaches the route (replies.py watches for it).
"""

from __future__ import annotations

import hmac
import json

from qlora_rt.config import host_name

OPEN_PATHS = ("/health",)  # answered without the key: a load balancer's probe


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body: int, allowed_hosts: tuple[str, ...] | None,
                 answered=None) -> None:
        """allowed_hosts: the Host names (without port) this server answers to; None = any. answered(scope,
        status): called as each response the app makes starts (the metrics)."""
        self.app, self.api_key, self.max_body, self.answered = app, api_key, max_body, answered
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            return await _error(send, 400, f"the Host header {headers.get('host', '')!r} is not one this server "
                                "answers to (it is bound to this machine; see docs/serving.md#security)",
                                "host_not_allowed")
        if self.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await _error(send, 401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                    "invalid_api_key", "authentication_error")
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return await _error(send, 413, self._too_large(size), "body_too_large")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its body arrived: nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _error(send, 413, self._too_large(f"more than {self.max_body}"), "body_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's disconnect, when it comes

        if self.answered is None:
            return await self.app(scope, replay, send)

        async def observed(message):
            if message["type"] == "http.response.start":
                self.answered(scope, message["status"])
            await send(message)
        return await self.app(scope, replay, observed)

    def _too_large(self, size: str) -> str:
        return (f"the body is {size} bytes; this server takes at most {self.max_body >> 20} MiB (--max-body-mb; "
                "a prompt longer than any context fits in far less)")


async def _error(send, status: int, message: str, code: str, kind: str = "invalid_request_error") -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
