"""How the API front end reaches the engine core: on a thread of its own process, or in a process of its own.

Both transports have one interface: `info` (what the core reported when it was ready), `start(on_outputs,
on_dead)` from the event loop, `send(msg)`, `alive`, `shutdown()`. Outputs arrive on the event loop as one
EngineCoreOutputs per step (one `call_soon_threadsafe`, not one per request); `on_dead` is called once if the
core stops without being asked to.

`process`: the core is a spawned process (it owns torch's threads; the API process does HTTP and text), reached
over ZMQ PUSH/PULL sockets on ipc:// paths with msgspec msgpack messages. A reader thread here waits on the output
socket and on the process's sentinel together, so a core that dies is noticed at once, not at the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

import msgspec
import zmq

from dspark.engine.messages import CoreFailed, CoreInput, CoreMessage, CoreReady, EngineCoreOutputs, Shutdown

log = logging.getLogger("dspark.engine")
OnOutputs = Callable[[EngineCoreOutputs], None]
OnDead = Callable[[str], None]


class ThreadCore:
    """The core on a thread of the API process: inputs through a queue, outputs handed to the event loop."""

    def __init__(self, engine):
        from dspark.engine.core import EngineCore

        self.core = EngineCore(engine)
        self.info = self.core.ready
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, on_outputs: OnOutputs, on_dead: OnDead) -> None:
        loop = asyncio.get_running_loop()

        def receive(block: bool) -> list[CoreInput]:
            msgs = []
            try:
                msgs.append(self._inbox.get(block=block))
                while True:
                    msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

        def run() -> None:
            try:
                self.core.run(receive, lambda batch: loop.call_soon_threadsafe(on_outputs, batch))
            except BaseException as e:  # reported (logged, and to every request in flight), not re-raised
                log.exception("engine core thread died")
                loop.call_soon_threadsafe(on_dead, f"engine core thread died: {e!r}")
                return
            if not self._stopping:
                loop.call_soon_threadsafe(on_dead, "engine core thread stopped")

        self._thread = threading.Thread(target=run, name="dspark-engine-core", daemon=True)
        self._thread.start()

    def send(self, msg: CoreInput) -> None:
        self._inbox.put(msg)

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout=10)


def run_core_process(settings: dict, in_addr: str, out_addr: str) -> None:
    """The core process's main: load the engine, say ready (or why not), then the busy loop until Shutdown or
    until the API process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when the core stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from dspark.engine.core import EngineCore
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings
    from dspark.logs import setup_logging

    cfg = Settings(**settings)
    setup_logging(cfg.log_level, cfg.log_format)
    ctx = zmq.Context()
    inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inp.connect(in_addr)
    out.connect(out_addr)
    out.setsockopt(zmq.SNDHWM, 0)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreInput)
    try:
        core = EngineCore(LLMEngine(cfg))
    except Exception as e:  # a bad model or setting: the API process reports it and exits
        out.send(enc.encode(CoreFailed(f"{type(e).__name__}: {e}")))
        out.close(linger=5000)
        raise SystemExit(1) from None
    out.send(enc.encode(core.ready))
    parent = os.getppid()

    def receive(block: bool) -> list[CoreInput]:
        msgs = []
        while block and not inp.poll(1000):
            if os.getppid() != parent:  # the API process died without a word: nothing is left to serve
                raise SystemExit(0)
        while True:
            try:
                msgs.append(dec.decode(inp.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return msgs

    core.run(receive, lambda batch: out.send(enc.encode(batch)))
    out.close(linger=2000)


class ProcessCore:
    """The core in a spawned process, over ZMQ; blocks in the constructor until it is ready (or failed)."""

    def __init__(self, settings, ready_timeout_s: float = 900.0):
        self._dir = tempfile.mkdtemp(prefix="dspark-core-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context()
        self._in, self._out = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._in.bind(in_addr)
        self._out.bind(out_addr)
        self._enc, self._dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreMessage)
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_core_process, args=(settings.model_dump(), in_addr, out_addr), name="dspark-engine-core",
            daemon=True)
        self.proc.start()
        # what the API process waits on, at start-up and then on the reader thread: outputs, or the core's exit
        self._poller = zmq.Poller()
        self._poller.register(self._out, zmq.POLLIN)
        self._poller.register(self.proc.sentinel, zmq.POLLIN)
        self._stopping = False
        self._reader: threading.Thread | None = None
        try:
            self.info = self._wait_ready(ready_timeout_s)
        except BaseException:
            self._close()
            raise

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        events = dict(self._poller.poll(timeout_s * 1000))
        if self._out in events:
            msg = self._dec.decode(self._out.recv())
            if isinstance(msg, CoreReady):
                return msg
            if isinstance(msg, CoreFailed):
                raise ValueError(msg.message)
        if self.proc.is_alive():
            raise RuntimeError(f"the engine core did not get ready in {timeout_s:.0f} s")
        raise RuntimeError(f"the engine core exited with code {self.proc.exitcode} before it was ready")

    @property
    def alive(self) -> bool:
        return self.proc.is_alive() and (self._reader is None or self._reader.is_alive())

    def start(self, on_outputs: OnOutputs, on_dead: OnDead) -> None:
        loop = asyncio.get_running_loop()

        def read() -> None:
            while True:
                events = dict(self._poller.poll())
                while True:  # outputs first: what the core sent before it died still reaches its requests
                    try:
                        msg = self._dec.decode(self._out.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    except zmq.ZMQError:  # closed by shutdown()
                        return
                    loop.call_soon_threadsafe(on_outputs, msg)
                if self.proc.sentinel in events:
                    self.proc.join(timeout=1)
                    if not self._stopping:
                        loop.call_soon_threadsafe(on_dead, f"the engine core process exited (code "
                                                           f"{self.proc.exitcode})")
                    return

        self._reader = threading.Thread(target=read, name="dspark-core-reader", daemon=True)
        self._reader.start()

    def send(self, msg: CoreInput) -> None:
        self._in.send(self._enc.encode(msg), copy=False)

    def shutdown(self) -> None:
        self._stopping = True
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._close()

    def _close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self._in.close(linger=0)
        self._out.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
