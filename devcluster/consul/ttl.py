"""Session TTL expiry, as the Raft leader runs it.

A TTL session that is not renewed within TTL x 2 (SessionTTLMultiplier) is
destroyed through a Raft apply, which releases or deletes its locks.  Timers
are leader memory: after a restart every TTL session gets a fresh full period.
"""

from __future__ import annotations

import asyncio
import heapq

from .goparse import SECOND
from .state import SESSION_TTL_MULTIPLIER, ConsulState, Session


class SessionTimers:
    """One loop timer for the earliest deadline; renewals supersede older deadlines."""

    def __init__(self, state: ConsulState) -> None:
        self._state = state
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def reset(self, session: Session) -> None:
        """Start or restart the session's expiry clock (create, renew, restore)."""
        ttl = session.ttl_nanos()
        if ttl <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ttl * SESSION_TTL_MULTIPLIER / SECOND
        self._deadlines[session.id] = deadline
        heapq.heappush(self._heap, (deadline, session.id))
        self._schedule()

    def arm_all(self) -> None:
        for session in list(self._state.sessions.values()):
            self.reset(session)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if not self._heap:
            return
        when = self._heap[0][0]
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)
        self._timer_at = when

    def _expire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        while self._heap and self._heap[0][0] <= now:
            deadline, session_id = heapq.heappop(self._heap)
            if self._deadlines.get(session_id) != deadline:
                continue  # renewed since, or already expired
            del self._deadlines[session_id]
            if session_id in self._state.sessions:
                self._state.session_destroy(session_id)
        self._schedule()
