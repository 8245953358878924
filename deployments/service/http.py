"""The receiver's HTTP endpoints, served by uvicorn in a background thread, with every limit in
one place: the body size, a deadline per body and per connection, and the connections at once.

    POST /webhooks/{github,gitea,gitlab}   a delivery, answered with the receiver's verdict
    GET  /healthz (/health)                 the outbox's deliveries by status
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deployments.ops.process import wait_until
from deployments.service.receiver import Receiver, Verdict
from tasks.errors import ServeError

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
CONNECTION_SECONDS = 30.0
BODY_SECONDS = 20.0


def build_app(receiver: Receiver) -> Starlette:
    """The receiver's HTTP endpoints, as a Starlette app."""

    async def webhook(request: Request) -> JSONResponse:
        provider = request.path_params["provider"]
        length_header = request.headers.get("content-length")
        if length_header is None or not length_header.isdigit():
            return _error(411, "Content-Length is required")
        length = int(length_header)
        if length > receiver.max_bytes:
            return _error(413, f"body of {length} bytes exceeds {receiver.max_bytes}")
        try:
            body = await asyncio.wait_for(request.body(), timeout=BODY_SECONDS)
        except TimeoutError:
            return _error(408, f"body not received within {BODY_SECONDS} s")
        except ClientDisconnect:
            return _error(400, "the sender went away before the body ended")
        if len(body) > receiver.max_bytes:
            return _error(413, f"body exceeds {receiver.max_bytes} bytes")
        try:
            # The outbox writes to SQLite: off the event loop.
            verdict = await run_in_threadpool(
                receiver.handle, provider, dict(request.headers), body
            )
        except Exception as exc:  # the receiver must never crash
            logger.exception("webhook handling failed")
            verdict = Verdict(500, {"error": f"internal error: {type(exc).__name__}"})
        said = verdict.body.get("status") or verdict.body.get("error")
        logger.info("POST %s -> %d %s", request.url.path, verdict.status, said)
        return _json(verdict)

    async def health(request: Request) -> JSONResponse:
        counts = await run_in_threadpool(receiver.outbox.counts)
        return _json(Verdict(200, {"status": "ok", "outbox": counts}))

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, "not found; POST to /webhooks/github, gitea or gitlab")

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return _error(405, "use POST")

    return Starlette(
        routes=[
            Route("/webhooks/{provider}", webhook, methods=["POST"]),
            Route("/webhooks/{provider}/", webhook, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )


def _json(verdict: Verdict) -> JSONResponse:
    return JSONResponse(verdict.body, status_code=verdict.status)


def _error(status: int, error: str) -> JSONResponse:
    return _json(Verdict(status, {"error": error}))


class HttpService:
    """The receiver served by uvicorn in a background thread. A webhook is one short request, so
    a connection still open after `seconds` (a body or headers sent a byte at a time) is closed,
    whatever its state: uvicorn has no such deadline, so a watch over its open connections
    (`Server.server_state`) keeps it."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, seconds: float) -> None:
        self.server = server
        self.seconds = seconds
        self.socket = sock
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self.thread = threading.Thread(target=self._run, name="textgen-receiver", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        watch = asyncio.create_task(self._deadlines())
        try:
            await self.server.serve(sockets=[self.socket])
        finally:
            watch.cancel()

    async def _deadlines(self) -> None:
        opened: dict[Any, float] = {}
        while True:
            now = time.monotonic()
            current = set(self.server.server_state.connections)
            opened = {c: opened.get(c, now) for c in current}
            for connection, since in opened.items():
                transport = getattr(connection, "transport", None)
                if now - since > self.seconds and transport is not None:
                    transport.close()
            await asyncio.sleep(min(0.5, self.seconds / 4))

    def shutdown(self) -> None:
        """Stop accepting, finish what is in flight (bounded), and stop the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=self.seconds + 5)

    def server_close(self) -> None:
        """Release the listening socket."""
        with contextlib.suppress(OSError):
            self.socket.close()


def start_http(
    receiver: Receiver,
    host: str,
    port: int,
    max_connections: int = MAX_CONNECTIONS,
    connection_seconds: float = CONNECTION_SECONDS,
) -> HttpService:
    """Serve the receiver on host:port in a background thread; returns the service. At most
    `max_connections` connections at once (more get 503), each closed after `connection_seconds`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    config = uvicorn.Config(
        build_app(receiver),
        http="h11",
        lifespan="off",
        access_log=False,
        log_config=None,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    service = HttpService(server, sock, connection_seconds)
    service.thread.start()
    wait_until(
        lambda: server.started or not service.thread.is_alive(), 30, "the receiver", interval=0.02
    )
    if not server.started:
        raise ServeError(f"the receiver could not serve on {host}:{port}; see the log above")
    return service
