"""A cap on request body size, so one request cannot make a replica buffer megabytes.

The largest valid request (256 chat messages of 32,000 characters) is about 8 MB of JSON;
anything beyond :data:`MAX_BODY_BYTES` is refused with 413 before it is parsed, whether it
announces its length or arrives in chunks.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 10 * 1024 * 1024


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: raise :class:`BodyTooLarge` once a body passes ``limit`` bytes.

    The exception surfaces where the route reads its body, so the app's exception
    handler answers it like any other error.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await _refuse(send, self.limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, limit: int) -> None:
    body = (
        b'{"error": {"message": "the request body is larger than %d bytes", '
        b'"type": "invalid_request_error", "param": null, "code": "request_too_large"}}' % limit
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
