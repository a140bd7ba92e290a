"""Graceful drain for rolling updates: uvicorn's server, with SIGTERM meaning "finish what you have, then go".

SIGTERM: admission stops (/ready answers 503, new API requests get 503 + Retry-After so a balancer retries them
elsewhere), /health stays 200 (the process is alive), and the server exits 0 once no API request is in flight or
the grace period is over, whichever is first. A second SIGTERM, or SIGINT, stops at once, as plain uvicorn does.
"""

from __future__ import annotations

import logging
import signal
import socket
import time

import uvicorn

from dspark.server.middleware import Admission

log = logging.getLogger("dspark.server")
SHUTDOWN_S = 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float, ignore_sigint: bool = False):
        super().__init__(config)
        self.admission, self.grace_s = admission, grace_s
        self.ignore_sigint = ignore_sigint  # an API server under the launcher: the launcher takes Ctrl-C
        self.drain_deadline: float | None = None
        self.exit_code = 0
        self.drain_logged = False
        self.exit_at: float | None = None  # the engine core died: stop then (after a short linger)

    def handle_exit(self, sig: int, frame) -> None:
        """Runs in a signal handler: only flags here (logging could re-enter a half-written line)."""
        if sig == signal.SIGINT and self.ignore_sigint:
            return
        if sig == signal.SIGTERM and self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.grace_s
            self.admission.start_drain()
        elif sig == signal.SIGTERM:
            self.should_exit = True  # second SIGTERM: stop now (still exit 0; nothing re-raised)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.exit_at is not None and time.monotonic() >= self.exit_at:
            self.should_exit = True
        if self.drain_deadline is not None and not self.drain_logged:
            self.drain_logged = True
            log.info("SIGTERM: draining", extra={"in_flight": self.admission.in_flight, "grace_s": self.grace_s})
        if self.drain_deadline is not None and not self.should_exit:
            over = time.monotonic() >= self.drain_deadline
            if self.admission.in_flight == 0 or over:
                log.info("drain done", extra={"in_flight": self.admission.in_flight, "grace_expired": over})
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, settings, sockets: list[socket.socket] | None = None, dead_linger_s: float = 0.0,
          ignore_sigint: bool = False) -> int:
    """Run until a drain, a signal, or the engine core's death ends it; the process's exit status: 0, or 1 when the
    engine core died (so that a supervisor restarts the server). For an API server under the --api-server-count
    launcher: `sockets`, listen there (the socket they share) instead of binding host:port; `dead_linger_s`, after
    the core's death keep answering (/health and /ready 503, API requests 503 engine_dead) this long before
    stopping; `ignore_sigint`, the launcher turns Ctrl-C into the SIGTERM it sends."""
    # After the drain uvicorn closes idle connections and gives the rest SHUTDOWN_S before cancelling them, so a
    # stream still running when the grace period ends is cut about grace + 1 s after SIGTERM.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, access_log=False, timeout_graceful_shutdown=SHUTDOWN_S)
    server = DrainingServer(config, app.state.admission, settings.drain_grace_s, ignore_sigint)
    engine = app.state.server.engine

    def fatal(reason: str) -> None:
        server.exit_code = 1
        if dead_linger_s > 0:
            server.exit_at = time.monotonic() + dead_linger_s
        else:
            server.should_exit = True

    engine.on_fatal = fatal
    server.run(sockets=sockets)
    if server.exit_code:
        log.error("exiting with status %d: the engine core died (%s)", server.exit_code, engine.dead_reason)
    return server.exit_code
