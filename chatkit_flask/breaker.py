"""A per-process circuit breaker for the upstream call. No Flask imports.

closed --(N consecutive failures)--> open --(cool-down passed)--> half-open
half-open: exactly one trial call goes through; others are refused at once.
  trial succeeds -> closed; trial fails -> open again for a full cool-down.

A "failure" is what says the upstream is down or broken (connection errors, timeouts, 5xx,
unusable 2xx). A 4xx or 429 proves the upstream is up and answering, so it counts as a
success here (a misconfigured key must not trip the breaker and hide the real error).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]

log = logging.getLogger("chatkit_flask.upstream")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Thread-safe. ``failures`` <= 0 disables it (``allow`` always says yes)."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    @property
    def state(self) -> str:
        with self._lock:
            return self._current_state()

    def _current_state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown:
            return HALF_OPEN
        return self._state

    def allow(self) -> tuple[bool, float]:
        """(whether this call may go upstream, seconds until it might be allowed again).

        A call that is allowed MUST be followed by ``record_success`` or ``record_failure``.
        """
        if not self.enabled:
            return True, 0.0
        with self._lock:
            if self._state == CLOSED:
                return True, 0.0
            remaining = self._opened_at + self.cooldown - self._clock()
            if self._state == OPEN and remaining > 0:
                return False, remaining
            # Cool-down over: half-open. One trial at a time; the rest keep being refused.
            if self._trial_in_flight:
                return False, 1.0
            self._trial_in_flight = True
            self._change(HALF_OPEN, "cool-down over; letting one trial request through")
            return True, 0.0

    def record_success(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._consecutive = 0
            if self._state != CLOSED:
                self._trial_in_flight = False
                self._change(CLOSED, "trial request succeeded; upstream calls resume")

    def record_failure(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._state == HALF_OPEN:
                self._trial_in_flight = False
                self._opened_at = self._clock()
                self._change(OPEN, f"trial request failed; refusing calls for {self.cooldown:g} s")
                return
            if self._state == OPEN:
                return  # a call admitted before the breaker opened finished late
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._opened_at = self._clock()
                self._change(
                    OPEN,
                    f"{self._consecutive} consecutive upstream failures; "
                    f"refusing calls for {self.cooldown:g} s",
                )

    def retry_after(self, remaining: float) -> int:
        """Whole seconds for a Retry-After header (at least 1)."""
        return max(1, math.ceil(remaining))

    def _change(self, state: str, why: str) -> None:
        # Called with the lock held.
        if state == self._state:
            return
        self._state = state
        if state == CLOSED:
            self._consecutive = 0
        log.warning("chatkit_flask: upstream circuit %s: %s", state.replace("_", "-"), why)
        if self.on_change is not None:
            try:
                self.on_change(state)
            except Exception:  # a metrics hook must never break the breaker
                log.exception("chatkit_flask: circuit state listener failed")
