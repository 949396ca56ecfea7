"""Server mode's gunicorn worker: one event loop per process writes every reply.

``gunicorn -k chatkit_flask.server.asgi_worker.ChatKitWorker 'site:app'`` (the shipped
``config/gunicorn.conf.py`` picks it in server mode) serves the same WSGI Flask app through
:class:`~chatkit_flask.server.asgi.AsgiAdapter` on uvicorn (uvloop and httptools): requests
are handled in ``--threads`` pool threads, replies are written by the loop. gunicorn's master
stays what it was (signals, worker restarts, the metrics directory, the config file); the
worker logs gunicorn's access line, and on SIGTERM drains open replies as the gthread set-up
does: they end with an error event asking the visitor to send again, ``graceful_timeout - 3``
seconds later, and new messages are refused meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType, SimpleNamespace
from typing import Any

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from uvicorn.config import Config
from uvicorn.server import Server

from .asgi import AsgiAdapter
from .bridge import drain_all

__all__ = ["ChatKitWorker"]

DRAIN_MARGIN = 3.0  # seconds of graceful_timeout left for the drained replies' last frames
# After an accept a worker holding N connections waits N x FAIR_SHARE_STEP (at most
# FAIR_SHARE_CAP steps: 2 ms, so one worker still takes 500 new connections a second).
FAIR_SHARE_STEP = 0.0001
FAIR_SHARE_CAP = 20
ACCEPT_BACKOFF = 0.1
REPLY_POLL = 0.05  # seconds between looks at the open replies during a shutdown

log = logging.getLogger("chatkit_flask")


class _DrainingServer(Server):
    """uvicorn's server; its first exit signal also drains the open replies. It accepts
    connections itself, one at a time, yielding to the other workers in proportion to the
    connections it holds (see :meth:`_accept`)."""

    def __init__(self, config: Config, drain_after: float) -> None:
        super().__init__(config)
        self._drain_after = drain_after
        self._acceptors: list[asyncio.Task[None]] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            drain_all(self._drain_after)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # no listener of uvicorn's: ours below
        protocol = functools.partial(
            self.config.http_protocol_class,
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        for listener in sockets or ():
            sock = getattr(listener, "sock", listener)  # gunicorn's wrapper holds the socket
            sock.setblocking(False)
            self._acceptors.append(asyncio.ensure_future(self._accept(sock, protocol)))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in self._acceptors:
            task.cancel()  # stop accepting before uvicorn closes what is open
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        await self._wait_for_replies()
        await super().shutdown(sockets)

    async def _wait_for_replies(self) -> None:
        """Keep idle keep-alive connections open while replies drain.

        uvicorn closes idle connections as soon as it shuts down; a request a proxy sends on
        one at that moment meets a closed socket, and a proxy does not retry a POST. While
        the drained replies run (at most ``drain_after``, then their last frames), a request
        on a kept connection still reaches the app, which refuses it with the restart
        message; then uvicorn closes the rest.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_after + DRAIN_MARGIN / 2
        while not self.force_exit and loop.time() < deadline:
            if not any(_mid_reply(c) for c in self.server_state.connections):
                return
            await asyncio.sleep(REPLY_POLL)

    async def _accept(self, sock: socket.socket, protocol: Callable[[], Any]) -> None:
        """Accept on the listening socket every worker shares, one connection at a time.

        uvicorn (uvloop) would accept every pending connection on each wake-up: a burst of
        new visitors then lands on whichever worker woke first, and their keep-alive
        connections stay there (all 16 of the bench's visitors on one worker in half the
        runs, the other idle). Here a worker that holds connections waits a little after each
        accept, longer the more it holds, so a less busy worker takes the next ones.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of file descriptors, say: back off, keep serving
                log.warning("chatkit_flask: accept failed (%s)", type(exc).__name__)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                await loop.connect_accepted_socket(protocol, conn, ssl=self.config.ssl)
            except OSError:  # the client left already
                conn.close()
                continue
            held = len(self.server_state.connections)
            if held > 1:
                await asyncio.sleep(min(held, FAIR_SHARE_CAP) * FAIR_SHARE_STEP)


def _mid_reply(connection: Any) -> bool:
    """Whether a uvicorn connection is between a request and the end of its response."""
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not cycle.response_complete


class ChatKitWorker(Worker):
    """A gunicorn worker running uvicorn with the WSGI app behind :class:`AsgiAdapter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own problems in gunicorn's error log; its info lines ("Started server
        # process") only repeat gunicorn's.
        logger = logging.getLogger("uvicorn.error")
        logger.handlers = self.log.error_log.handlers
        logger.setLevel(max(logging.WARNING, self.log.error_log.level))
        logger.propagate = False
        cfg = self.cfg
        self.config = Config(
            app=None,
            loop="auto",  # uvloop when installed
            http="auto",  # httptools when installed
            lifespan="off",
            log_config=None,
            access_log=False,  # gunicorn's access line is written by the adapter
            proxy_headers=False,  # the app reads X-Forwarded-For itself (CHATKIT_TRUSTED_PROXIES)
            timeout_keep_alive=cfg.keepalive,
            timeout_notify=self.timeout,
            callback_notify=self._notify,
            limit_max_requests=self.max_requests or None,
            timeout_graceful_shutdown=cfg.graceful_timeout,
            backlog=cfg.backlog,
        )

    def init_signals(self) -> None:
        # uvicorn installs its own handlers for INT, TERM (and QUIT below) while it serves;
        # gunicorn's would swallow them.
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.siginterrupt(signal.SIGUSR1, False)

    def run(self) -> None:
        with asyncio.Runner(loop_factory=self.config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        cfg = self.cfg
        forwarded = [ip.strip() for ip in str(cfg.forwarded_allow_ips).split(",")]
        self.config.app = AsgiAdapter(
            self.wsgi, threads=cfg.threads, access_log=self._access, forwarded_allow=forwarded
        )
        server = _DrainingServer(self.config, max(1.0, cfg.graceful_timeout - DRAIN_MARGIN))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, self.handle_exit, signal.SIGQUIT, None)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    async def _notify(self) -> None:
        self.notify()

    def _access(
        self,
        environ: dict[str, Any],
        status: str,
        headers: list[tuple[str, str]],
        sent: int,
        seconds: float,
    ) -> None:
        """gunicorn's access line, from the stand-ins its logger reads."""
        response = SimpleNamespace(status=status, headers=headers, sent=sent)
        request = SimpleNamespace(
            headers=[
                (key[5:].replace("_", "-"), value)
                for key, value in environ.items()
                if key.startswith("HTTP_")
            ]
        )
        self.log.access(response, request, environ, datetime.timedelta(seconds=seconds))
