"""How the API front end reaches the engine core: on a thread of its own process, or in a process of its own.

Both transports have one interface: `info` (what the core reported when it was ready), `start(on_outputs,
on_dead)` from the event loop, `send(msg)`, `alive`, `shutdown()`. Outputs arrive on the event loop as one
EngineCoreOutputs per step (one `call_soon_threadsafe`, not one per request); `on_dead` is called once if the
core stops without being asked to.

`process`: the core is a spawned process (it owns torch's threads; the API process does HTTP and text), reached
over ZMQ PUSH/PULL sockets on ipc:// paths with msgspec msgpack messages. A reader thread here waits on the output
socket and on the process's sentinel together, so a core that dies is noticed at once, not at the next request.

`--api-server-count N`: a launcher starts one core for N API servers (`SharedCore`), each of which reaches it as
an `AttachedCore`: its own pair of sockets (the core connects to every API server's pair and routes each output to
the API server that sent its request), and the core's exit watched through a pidfd, since the core is the
launcher's child, not the API server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import select
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from dspark.engine.messages import CoreFailed, CoreInput, CoreMessage, CoreReady, EngineCoreOutputs, Shutdown

log = logging.getLogger("dspark.engine")
OnOutputs = Callable[[EngineCoreOutputs], None]
OnDead = Callable[[str], None]


class ThreadCore:
    """The core on a thread of the API process: inputs through a queue, outputs handed to the event loop."""

    index = 0  # the core's one client

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
                self.core.run(receive, lambda _, batch: loop.call_soon_threadsafe(on_outputs, batch))
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
        if not self.alive:
            self.core.engine.close()  # tensor-parallel workers, if any


def run_core_process(settings: dict, in_addrs: list[str], out_addrs: list[str], ready_addr: str | None = None
                     ) -> None:
    """The core process's main: load the engine, say ready (or why not), then the busy loop until Shutdown or
    until the process that started it is gone. It reads every address of `in_addrs` and sends client i's outputs to
    `out_addrs[i]`; CoreReady / CoreFailed go to `ready_addr` (default: client 0's output)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process (or the launcher) decides when the core stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from dspark.engine.core import EngineCore
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings
    from dspark.logs import setup_logging

    cfg = Settings(**settings)
    setup_logging(cfg.log_level, cfg.log_format)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    outs = [ctx.socket(zmq.PUSH) for _ in out_addrs]
    for sock in [inp, *outs]:
        sock.setsockopt(zmq.RECONNECT_IVL, 20)  # an API server that binds after the core is ready is reached soon
    for addr in in_addrs:
        inp.connect(addr)
    for sock, addr in zip(outs, out_addrs):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(addr)
    ready = outs[0]
    if ready_addr is not None:
        ready = ctx.socket(zmq.PUSH)
        ready.connect(ready_addr)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreInput)
    try:
        core = EngineCore(LLMEngine(cfg), clients=len(outs))
    except Exception as e:  # a bad model or setting: the API process (or the launcher) reports it and exits
        ready.send(enc.encode(CoreFailed(f"{type(e).__name__}: {e}")))
        ready.close(linger=5000)
        raise SystemExit(1) from None
    ready.send(enc.encode(core.ready))
    if ready_addr is not None:
        ready.close(linger=5000)
    parent = os.getppid()

    def receive(block: bool) -> list[CoreInput]:
        msgs = []
        while block and not inp.poll(1000):
            if os.getppid() != parent:  # the process that started it died without a word: nothing is left to serve
                raise SystemExit(0)
        while True:
            try:
                msgs.append(dec.decode(inp.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return msgs

    if len(outs) == 1:
        out = outs[0]
        core.run(receive, lambda _, batch: out.send(enc.encode(batch)))
    else:
        core.run(receive, lambda client, batch: outs[client].send(enc.encode(batch)))
    core.engine.close()  # tensor-parallel workers, if any
    for sock in outs:
        sock.close(linger=2000)


def _spawn_core(settings, in_addrs: list[str], out_addrs: list[str], ready_addr: str | None = None):
    proc = multiprocessing.get_context("spawn").Process(
        target=run_core_process, args=(settings.model_dump(), in_addrs, out_addrs, ready_addr),
        name="dspark-engine-core", daemon=True)
    proc.start()
    return proc


def _stop_core(proc, send_shutdown: Callable[[], None], timeout_s: float = 10.0) -> None:
    """Ask a live core to stop (Shutdown), give it `timeout_s`, then kill it."""
    if not proc.is_alive():
        return
    with contextlib.suppress(zmq.ZMQError):
        send_shutdown()
    proc.join(timeout=timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)


def _wait_ready(poller: zmq.Poller, sock: zmq.Socket, proc, timeout_s: float) -> CoreReady:
    """The core's first word on `sock` (CoreReady, or CoreFailed raised as ValueError), or why none came."""
    events = dict(poller.poll(timeout_s * 1000))
    if sock in events:
        msg = msgspec.msgpack.decode(sock.recv(), type=CoreMessage)
        if isinstance(msg, CoreReady):
            return msg
        if isinstance(msg, CoreFailed):
            raise ValueError(msg.message)
    if proc.is_alive():
        raise RuntimeError(f"the engine core did not get ready in {timeout_s:.0f} s")
    raise RuntimeError(f"the engine core exited with code {proc.exitcode} before it was ready")


class _CoreConnection:
    """An API process's end of the core's sockets: binds its input (PUSH) and output (PULL) ipc endpoints; a reader
    thread waits on the outputs and on `_exit_fd` (readable once the core has exited) together."""

    index = 0  # this API server's client number at the core
    _exit_fd: int | None = None

    def __init__(self, in_addr: str, out_addr: str):
        self._ctx = zmq.Context()
        self._in, self._out = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._in.bind(in_addr)
        self._out.bind(out_addr)
        self._enc, self._dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(CoreMessage)
        self._poller = zmq.Poller()
        self._poller.register(self._out, zmq.POLLIN)
        self._stopping = False
        self._reader: threading.Thread | None = None

    def _core_exited(self, events: dict) -> bool:
        """After a poll: has the core exited? (its exit fd fired)"""
        return self._exit_fd is not None and self._exit_fd in events

    def _exit_reason(self) -> str:
        raise NotImplementedError

    def _poll_ms(self) -> int | None:
        return None

    def start(self, on_outputs: OnOutputs, on_dead: OnDead) -> None:
        loop = asyncio.get_running_loop()

        def read() -> None:
            while True:
                events = dict(self._poller.poll(self._poll_ms()))
                while True:  # outputs first: what the core sent before it died still reaches its requests
                    try:
                        msg = self._dec.decode(self._out.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    except zmq.ZMQError:  # closed by shutdown()
                        return
                    loop.call_soon_threadsafe(on_outputs, msg)
                if self._stopping and self._wake_fd_fired(events):
                    return
                if self._core_exited(events):
                    if not self._stopping:
                        loop.call_soon_threadsafe(on_dead, self._exit_reason())
                    return

        self._reader = threading.Thread(target=read, name="dspark-core-reader", daemon=True)
        self._reader.start()

    def _wake_fd_fired(self, events: dict) -> bool:
        return False

    def send(self, msg: CoreInput) -> None:
        self._in.send(self._enc.encode(msg), copy=False)

    def _close_sockets(self, linger_ms: int = 0) -> None:
        self._in.close(linger=linger_ms)
        self._out.close(linger=0)
        self._ctx.term()


class ProcessCore(_CoreConnection):
    """The core in a spawned process, over ZMQ; blocks in the constructor until it is ready (or failed)."""

    def __init__(self, settings, ready_timeout_s: float = 900.0):
        self._dir = tempfile.mkdtemp(prefix="dspark-core-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        super().__init__(in_addr, out_addr)
        self.proc = _spawn_core(settings, [in_addr], [out_addr])
        # what the API process waits on, at start-up and then on the reader thread: outputs, or the core's exit
        self._exit_fd = self.proc.sentinel
        self._poller.register(self._exit_fd, zmq.POLLIN)
        try:
            self.info = _wait_ready(self._poller, self._out, self.proc, ready_timeout_s)
        except BaseException:
            self._close()
            raise

    @property
    def alive(self) -> bool:
        return self.proc.is_alive() and (self._reader is None or self._reader.is_alive())

    def _exit_reason(self) -> str:
        self.proc.join(timeout=1)
        return f"the engine core process exited (code {self.proc.exitcode})"

    def shutdown(self) -> None:
        self._stopping = True
        _stop_core(self.proc, lambda: self.send(Shutdown()))
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._close()

    def _close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self._close_sockets()
        shutil.rmtree(self._dir, ignore_errors=True)


class SharedCore:
    """The launcher's handle on one core process serving `clients` API servers: spawns it with a pair of ipc
    endpoints per API server (which bind them later and attach as `AttachedCore`), waits until it is ready, and
    stops it (Shutdown on a control socket of its own) once they are gone."""

    def __init__(self, settings, clients: int, ready_timeout_s: float = 900.0):
        self.dir = tempfile.mkdtemp(prefix="dspark-core-")
        self.in_addrs = [f"ipc://{self.dir}/in{i}" for i in range(clients)]
        self.out_addrs = [f"ipc://{self.dir}/out{i}" for i in range(clients)]
        self._ctx = zmq.Context()
        self._ctl, ready = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._ctl.bind(f"ipc://{self.dir}/ctl")
        ready.bind(f"ipc://{self.dir}/ready")
        self.proc = _spawn_core(settings, [*self.in_addrs, f"ipc://{self.dir}/ctl"], self.out_addrs,
                                f"ipc://{self.dir}/ready")
        poller = zmq.Poller()
        poller.register(ready, zmq.POLLIN)
        poller.register(self.proc.sentinel, zmq.POLLIN)
        try:
            self.info = _wait_ready(poller, ready, self.proc, ready_timeout_s)
        except BaseException:
            ready.close(linger=0)
            self.shutdown()
            raise
        ready.close(linger=0)

    def endpoints(self, client: int) -> tuple[str, str]:
        return self.in_addrs[client], self.out_addrs[client]

    def shutdown(self, timeout_s: float = 10.0) -> None:
        _stop_core(self.proc, lambda: self._ctl.send(msgspec.msgpack.encode(Shutdown()), zmq.NOBLOCK), timeout_s)
        self._ctl.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pid_gone(pid: int) -> bool:
    """Without a pidfd: has this process (not our child) exited? A zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


class AttachedCore(_CoreConnection):
    """An API server's link to a core another process started (`SharedCore`): its own input and output endpoints,
    and the core's exit seen through a pidfd (pollable beside the sockets; it works for a process that is not our
    child), or, where there is none, by checking the pid every half second."""

    def __init__(self, info: CoreReady, in_addr: str, out_addr: str, core_pid: int, index: int,
                 connect_timeout_s: float = 30.0):
        super().__init__(in_addr, out_addr)
        self.info, self.index, self.core_pid = info, index, core_pid
        self._wake_r, self._wake_w = os.pipe()  # shutdown() wakes the reader, which polls a core that stays up
        self._poller.register(self._wake_r, zmq.POLLIN)
        try:
            self._exit_fd = os.pidfd_open(core_pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: poll the pid instead
            self._exit_fd = None
        if self._exit_fd is not None:
            self._poller.register(self._exit_fd, zmq.POLLIN)
        try:
            self._wait_connected(connect_timeout_s)
        except BaseException:
            self._close()
            raise

    def _wait_connected(self, timeout_s: float) -> None:
        """Until the core has connected to our input (a send would block before): it retries every 20 ms."""
        deadline = time.monotonic() + timeout_s
        while not self._in.poll(100, zmq.POLLOUT):
            if self._gone():
                raise RuntimeError(f"the engine core (pid {self.core_pid}) is gone")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine core (pid {self.core_pid}) did not connect in {timeout_s:.0f} s")

    def _gone(self) -> bool:
        if self._exit_fd is None:
            return _pid_gone(self.core_pid)
        return bool(select.select([self._exit_fd], [], [], 0)[0])

    def _poll_ms(self) -> int | None:
        return None if self._exit_fd is not None else 500

    def _core_exited(self, events: dict) -> bool:
        if self._exit_fd is not None:
            return self._exit_fd in events
        return _pid_gone(self.core_pid)

    def _wake_fd_fired(self, events: dict) -> bool:
        return self._wake_r in events

    def _exit_reason(self) -> str:
        return f"the engine core process (pid {self.core_pid}) exited"

    @property
    def alive(self) -> bool:
        return not self._gone() and (self._reader is None or self._reader.is_alive())

    def shutdown(self) -> None:
        """Let go of the core (which serves the other API servers and stops when the launcher says so)."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._close(linger_ms=1000)  # aborts still queued reach the core

    def _close(self, linger_ms: int = 0) -> None:
        self._close_sockets(linger_ms)
        for fd in (self._wake_r, self._wake_w, self._exit_fd):
            if fd is not None:
                os.close(fd)
