"""The batch engine in a child process, behind the same submit / cancel / snapshot API.

Why: the decode loop runs Python between short torch ops almost all the time, so in the server's
own process it holds the GIL and every socket call of the HTTP event loop waits for it (measured:
`socket.send` 0.6 ms, `os.urandom` 1.8 ms per call under load), which starves both sides. In a child
process the model loop and the HTTP loop run in parallel. Messages are small pickles over a pipe:
rows go down, events come up, read by one thread that hands them to each request's sink.

Messages down the pipe go through one sender thread, never from under the lock the reader needs: a
send blocked on a full pipe while holding it stopped the reader, so the child, blocked sending events
up, stopped reading, and the server hung for good (after a few hundred cancelled requests).

Back-pressure is decided here, synchronously: at most `max_batch_size + max_queue` sequences may be
in flight (running or waiting); beyond that `submit` raises `QueueFull` at once.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import threading
from typing import Any

from ..errors import UserError
from ..options import LIBRARY_DECODER
from .engine import Cancellable, EngineStopped, QueueFull, RowEvent, RowRequest, Sink, Ticket, check_rows

log = logging.getLogger("codegen2.serve")


def _child_main(conn, checkpoint: str, load_kwargs: dict, engine_kwargs: dict, threads: int) -> None:
    """Load the model, run a BatchEngine, and relay messages until told to stop or the parent goes."""
    engine = _load_engine(conn, checkpoint, load_kwargs, engine_kwargs, threads)
    if engine is None:
        return
    engine.start()
    try:
        _Relay(conn, engine).run()
    finally:
        engine.stop()
        conn.close()


def _load_engine(conn, checkpoint: str, load_kwargs: dict, engine_kwargs: dict, threads: int):
    """The child's BatchEngine, announced to the parent ("ready"), or None after sending the load error."""
    import torch

    from ..loading import load_checkpoint
    from .engine import BatchEngine

    if threads:
        torch.set_num_threads(threads)
    try:
        loaded = load_checkpoint(checkpoint, **load_kwargs)
    except Exception as exc:  # report any load failure as one line to the parent
        conn.send(("error", f"{exc}" if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"))
        return None
    engine = BatchEngine(loaded.model, loaded.tokenizer, bidirectional_prompt=loaded.prefix_lm, **engine_kwargs)
    conn.send(("ready", {"tokenizer": loaded.tokenizer, "n_ctx": engine.n_ctx, "vocab_size": engine.vocab_size,
                         "source": loaded.source, "compile_seconds": engine.compile_seconds}))
    return engine


class _Relay:
    """The child's side of the pipe: messages from the parent go to the engine, events go back up."""

    def __init__(self, conn, engine):
        self.conn, self.engine = conn, engine
        self.send_lock = threading.Lock()
        self.tickets: dict[int, Ticket] = {}

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def sink_for(self, ticket_id: int, size: int) -> Sink:
        left = [size]

        def sink(event: RowEvent) -> None:
            self.send(("event", ticket_id, event))
            if event.finish_reason is not None:
                left[0] -= 1
                if left[0] == 0:
                    self.tickets.pop(ticket_id, None)
        return sink

    def run(self) -> None:
        """Serve the parent's messages until it says stop or goes away."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            kind = message[0]
            if kind == "submit":
                self.submit(*message[1:])
            elif kind == "cancel":
                ticket = self.tickets.pop(message[1], None)
                if ticket is not None:
                    ticket.cancel()
            elif kind == "stats":
                self.send(("stats", self.engine.snapshot()))
            elif kind == "stop":
                return

    def submit(self, ticket_id: int, rows: list[RowRequest]) -> None:
        try:
            self.tickets[ticket_id] = self.engine.submit(rows, self.sink_for(ticket_id, len(rows)))
        except (QueueFull, EngineStopped, ValueError) as exc:
            for i in range(len(rows)):
                self.send(("event", ticket_id, RowEvent(i, "", "error", 0, error=str(exc))))


class ProcessEngine(Cancellable):
    """A `BatchEngine` running in a spawned child process; same methods the HTTP layer uses."""

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str = "cpu",
        dtype=None,
        mp_num: int | None = None,
        step: int | None = None,
        adapter: str | None = None,
        threads: int = 0,
        max_batch_size: int = 32,
        max_queue: int = 256,
        load_timeout: float | None = None,
        decoder: str = LIBRARY_DECODER,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
        self._conn, child_conn = context.Pipe()
        # The child's own queue is only a safety net: the bound is enforced here.
        engine_kwargs = {"max_batch_size": max_batch_size, "max_queue": 4 * (max_batch_size + max_queue),
                         "decoder": decoder}
        load_kwargs = {"device": device, "dtype": dtype, "mp_num": mp_num, "step": step, "adapter": adapter}
        self._proc = context.Process(target=_child_main, name="codegen2-engine", daemon=True,
                                     args=(child_conn, str(checkpoint), load_kwargs, engine_kwargs, threads))
        self._proc.start()
        child_conn.close()
        kind, payload = self._wait_ready(load_timeout)
        if kind == "error":
            self._proc.join(10)
            raise UserError(payload)
        self.tokenizer = payload["tokenizer"]
        self.n_ctx: int = payload["n_ctx"]
        self.vocab_size: int = payload["vocab_size"]
        self.source: str = payload["source"]
        self.compile_seconds: float = payload["compile_seconds"]  # the decode step's, at start-up (0: none)

        self._lock = threading.Lock()  # guards the fields below
        self._sinks: dict[int, list[Any]] = {}  # ticket id -> [sink, rows not finished]
        self._in_flight = 0
        self._ids = itertools.count()
        self._stats_reply: dict | None = None
        self._stats_ready = threading.Condition(self._lock)
        self._stopped = False
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()  # messages for the child, in order
        self._sender = threading.Thread(target=self._send_loop, name="codegen2-engine-sender", daemon=True)
        self._sender.start()
        self._reader = threading.Thread(target=self._read, name="codegen2-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float | None) -> tuple[str, Any]:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._proc.is_alive():
                raise UserError(f"the model process exited with status {self._proc.exitcode} while loading")
            if timeout is not None and waited >= timeout:
                self._proc.kill()
                raise UserError(f"the model did not load within {timeout:.0f} s")
        try:
            return self._conn.recv()
        except EOFError:
            raise UserError("the model process exited while loading") from None

    # ------------------------------------------------------------------------------ public API
    @property
    def max_rows_per_submit(self) -> int:
        return self.max_batch_size + self.max_queue

    def start(self) -> None:
        """The child runs from construction on; kept for API parity with `BatchEngine`."""

    def submit(self, rows: list[RowRequest], sink: Sink) -> Ticket:
        check_rows(rows, self.n_ctx)
        with self._lock:
            if self._stopped:
                raise EngineStopped("the server is shutting down")
            limit = self.max_batch_size + self.max_queue
            if self._in_flight + len(rows) > limit:
                raise QueueFull(f"the server is busy ({self._in_flight} sequences in flight, limit {limit}); "
                                f"retry later")
            ticket = Ticket(self, len(rows), next(self._ids))
            self._sinks[ticket.id] = [sink, len(rows)]
            self._in_flight += len(rows)
            self._outbox.put(("submit", ticket.id, rows))
        return ticket

    def _forget(self, ticket: Ticket) -> None:
        entry = self._sinks.pop(ticket.id, None)
        if entry is None or self._stopped:
            return
        self._in_flight -= entry[1]
        self._outbox.put(("cancel", ticket.id))

    def snapshot(self, timeout: float = 10.0) -> dict:
        with self._lock:
            if self._stopped:
                return {"active": 0, "waiting": 0, "in_flight": 0, "stopped": True}
            self._stats_reply = None
            self._outbox.put(("stats",))
            if not self._stats_ready.wait_for(lambda: self._stats_reply is not None or self._stopped, timeout):
                raise TimeoutError("the model process did not answer")
            reply = dict(self._stats_reply or {})
            # The bounds enforced are this process's, not the child's safety-net queue.
            reply.update(in_flight=self._in_flight, max_batch_size=self.max_batch_size, max_queue=self.max_queue)
            return reply

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._outbox.put(("stop",))
            self._outbox.put(None)
            self._stats_ready.notify_all()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(5)
        self._fail_all("the server is shutting down")

    # ----------------------------------------------------------------------- sender, reader threads
    def _send_loop(self) -> None:
        """Send queued messages to the child until told to end (None) or the pipe breaks."""
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._conn.send(message)
            except OSError:  # the child is gone; the reader reports it
                return

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "event":
                _, ticket_id, event = message
                with self._lock:
                    entry = self._sinks.get(ticket_id)
                    if entry is not None and event.finish_reason is not None:
                        entry[1] -= 1
                        self._in_flight -= 1
                        if entry[1] == 0:
                            del self._sinks[ticket_id]
                if entry is not None:
                    try:
                        entry[0](event)
                    except Exception:  # the receiving event loop is closed: nobody waits for it
                        log.debug("dropped an event for ticket %s", ticket_id)
            elif message[0] == "stats":
                with self._lock:
                    self._stats_reply = message[1]
                    self._stats_ready.notify_all()
        with self._lock:
            unexpected = not self._stopped
            self._stopped = True
            self._stats_ready.notify_all()
        if unexpected:
            log.error("the model process exited (status %s)", self._proc.exitcode)
            self._fail_all("the model process exited")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            entries, self._sinks = list(self._sinks.values()), {}
            self._in_flight = 0
        for sink, left in entries:
            for _ in range(left):
                # Row indexes are unknown here; -1 marks "every unfinished row of the ticket".
                try:
                    sink(RowEvent(-1, "", "error", 0, error=message))
                except Exception:
                    pass
