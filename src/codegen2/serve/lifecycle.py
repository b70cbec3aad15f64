"""What the server does about clients that hang up and about its own shutdown, shared by every route.

Editors abort a request on nearly every keystroke, so a hang-up is routine: it is counted (`/health`)
and logged as one aggregated line per interval, never as a traceback. On SIGTERM the server stops
taking new work at once, gives requests in flight `grace` seconds to finish, then cancels them (503,
or an error event in a stream), so that the process exits within seconds even with clients that never
finish sending or reading.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("codegen2.serve")

HANG_UP_LOG_SECONDS = 5.0
DRAIN_GRACE_SECONDS = 3.0  # in-flight requests may finish this long after SIGTERM, then they are cancelled


class HangUps:
    """Clients that went away mid-request: a running total, and one log line per `interval` at most."""

    def __init__(self, interval: float = HANG_UP_LOG_SECONDS):
        self.interval = interval
        self.total = 0
        self._pending = 0

    def record(self) -> None:
        self.total += 1
        self._pending += 1

    def flush(self) -> None:
        """Log the hang-ups since the last line, if any."""
        if self._pending:
            log.warning("%d client(s) hung up mid-request in the last %.0f s (%d since start)",
                        self._pending, self.interval, self.total)
            self._pending = 0

    async def run(self) -> None:
        """Flush every interval until cancelled (the app's lifespan owns this task)."""
        while True:
            await asyncio.sleep(self.interval)
            self.flush()


class Drain:
    """The server's shutdown state: `begin` (from a signal handler) refuses new work, `expired` ends the wait."""

    def __init__(self, grace: float = DRAIN_GRACE_SECONDS):
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._expired: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the serving event loop (at start-up)."""
        self._loop, self._stopping, self._expired = loop, asyncio.Event(), asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    def begin(self) -> None:
        """Start draining; safe from any thread or a signal handler."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        assert self._stopping is not None and self._expired is not None and self._loop is not None
        if not self._stopping.is_set():
            self._stopping.set()
            log.warning("shutting down: new requests get 503; requests in flight have %.0f s to finish",
                        self.grace)
            self._loop.call_later(self.grace, self._expired.set)

    async def expired(self) -> None:
        """Return once the grace period after `begin` has passed (never, while serving)."""
        if self._expired is None:
            await asyncio.Event().wait()
        else:
            await self._expired.wait()
