"""`dspark serve --api-server-count N`: N API server processes on one engine core, as vLLM's --api-server-count.

The launcher (the `dspark serve` process) binds the listening socket, starts the engine core process and waits
until it is ready, then starts N API server processes (spawned). Each runs the same FastAPI app and drain as a
single server, on the inherited socket (the kernel hands each new connection to one of them), and reaches the core
as its own client (`AttachedCore`): HTTP, tokenization, detokenization, stop strings, admission (max_waiting / N
each, rounded up) and the metrics of its own requests. Prometheus runs in multiprocess mode (a temporary
PROMETHEUS_MULTIPROC_DIR set before any API server imports prometheus_client), so /metrics from any of them is the
sum over all.

Signals: SIGTERM or SIGINT to the launcher sends SIGTERM to every API server, each of which drains as a single
server does; the launcher then stops the core and exits 0. A second one stops them at once. The API servers (and
the core) ignore SIGINT, so Ctrl-C in a terminal, which signals the whole process group, drains once. If the core
or an API server dies on its own, the others are stopped (those attached to a dead core end their requests with
errors and exit by themselves) and the launcher exits 1, so that a supervisor restarts the whole server. Send
SIGTERM to the launcher only: an API server that gets it directly as well (a whole cgroup signalled) sees a
second SIGTERM, which stops it at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

log = logging.getLogger("dspark.server")
BACKLOG = 2048  # uvicorn's default
KILL_AFTER_S = 15.0  # past the drain's grace period (plus this), an API server still running is killed
# After the core dies an API server answers 503 this long before it exits (its requests in flight have ended at
# once), so that a probe on the shared socket finds one that says why rather than a connection being closed.
DEAD_LINGER_S = 1.0


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound now (a port in use fails before the model loads); `listen()` once the API servers are about to start,
    so that clients are refused, not left waiting, while the core loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {e}") from None
    return sock


def api_server_main(index: int, count: int, settings: dict, sock: socket.socket, info, in_addr: str, out_addr: str,
                    core_pid: int) -> None:
    """One API server process: the app and the drain of a single server, on the shared socket, attached to the
    core as client `index`."""
    from dspark.engine.core_client import AttachedCore
    from dspark.engine.settings import Settings
    from dspark.engine.tokenizer import Tokenizer
    from dspark.logs import setup_logging
    from dspark.server.app import create_app
    from dspark.server.async_llm import AsyncLLM
    from dspark.server.drain import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited already; the launcher takes Ctrl-C
    cfg = Settings(**settings)
    setup_logging(cfg.log_level, cfg.log_format)
    client = AttachedCore(info, in_addr, out_addr, core_pid, index)
    max_waiting = -(-cfg.max_waiting // count)  # the bound is per API server: max_waiting / N, rounded up
    engine = AsyncLLM(client, Tokenizer(cfg.model), max_waiting)
    app = create_app(engine, cfg)
    sys.exit(serve(app, cfg, sockets=[sock], dead_linger_s=DEAD_LINGER_S, ignore_sigint=True))


def run_api_servers(settings) -> int:
    """The launcher: the core, N API servers on one socket, and the exit status (0, or 1 if anything died)."""
    from dspark.engine.core_client import SharedCore

    n = settings.api_server_count
    sock = listening_socket(settings.host, settings.port)
    prom_dir = tempfile.mkdtemp(prefix="dspark-prometheus-")
    core: SharedCore | None = None
    procs: list[multiprocessing.Process] = []

    def stop_starting(sig: int, frame) -> None:  # while the core loads: stop it and clean up, then exit
        raise SystemExit(128 + sig)

    previous = {sig: signal.signal(sig, stop_starting) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            core = SharedCore(settings, n)
        except ValueError as e:  # CoreFailed: a bad model or setting
            raise SystemExit(f"the engine core could not start: {e}") from None
        sock.listen(BACKLOG)
        # before any API server imports prometheus_client (spawned: fresh interpreters that inherit the environment)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
        ctx = multiprocessing.get_context("spawn")
        for i in range(n):
            p = ctx.Process(target=api_server_main, name=f"dspark-api-server-{i}",
                            args=(i, n, settings.model_dump(), sock, core.info, *core.endpoints(i), core.proc.pid))
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec: ignored from their first line
            try:
                p.start()
            finally:
                signal.signal(signal.SIGINT, stop_starting)
            procs.append(p)
        sock.close()  # theirs now: once they have all exited, new connections are refused
        log.info("%d API servers on http://%s:%d (pids %s), engine core pid %d", n, settings.host, settings.port,
                 ", ".join(str(p.pid) for p in procs), core.proc.pid)
        return supervise(core, procs, prom_dir, settings.drain_grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if core is not None:
            core.shutdown()
        sock.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(prom_dir, ignore_errors=True)


def supervise(core, procs: list, prom_dir: str, grace_s: float) -> int:
    """Wait for the API servers to exit, passing signals on; stop them all when one of them or the core dies."""
    from prometheus_client import multiprocess

    state: dict = {"signal": None, "stopping": False, "deadline": None}
    failed: list[str] = []

    def send(sig: int) -> None:
        for p in procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def stopping(extra_s: float) -> None:
        state["stopping"] = True
        if state["deadline"] is None:
            state["deadline"] = time.monotonic() + extra_s + KILL_AFTER_S

    def on_signal(sig: int, frame) -> None:  # SIGTERM or SIGINT: SIGTERM to each (a second: they stop at once)
        state["signal"] = state["signal"] or sig
        stopping(grace_s)
        send(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = {p.sentinel: p for p in procs}
        watch_core = True
        while running:
            waits = [*running, core.proc.sentinel] if watch_core else list(running)
            for ready in multiprocessing.connection.wait(waits, timeout=0.5):
                if ready == core.proc.sentinel:
                    watch_core = False
                    core.proc.join(1)
                    failed.append(f"the engine core exited (code {core.proc.exitcode})")
                    stopping(0.0)  # its API servers see it too (pidfd): they fail their requests and exit 1
                    continue
                p = running.pop(ready)
                p.join(1)
                multiprocess.mark_process_dead(p.pid, prom_dir)
                # asked to stop: a clean exit, or SIGTERM's default action (it came before their handlers)
                if p.exitcode not in (0, -signal.SIGTERM) or state["signal"] is None:
                    failed.append(f"{p.name} (pid {p.pid}) exited with code {p.exitcode}")
                    if not state["stopping"]:  # stop the rest, so that a supervisor restarts the whole server
                        stopping(grace_s)
                        send(signal.SIGTERM)
            if running and state["deadline"] is not None and time.monotonic() > state["deadline"]:
                for p in running.values():
                    log.error("%s (pid %d) did not stop: killing it", p.name, p.pid)
                    p.kill()
                state["deadline"] = time.monotonic() + KILL_AFTER_S
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        log.error("exiting with status 1: %s", "; ".join(failed))
        return 1
    return 0
