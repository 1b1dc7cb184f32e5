"""A stand-in for the time module in tests of the wait loop: its clock moves only when something sleeps."""

from __future__ import annotations

#: What time() answers at monotonic() 0.
EPOCH = 1_700_000_000.0


class FakeTime:
    """monotonic(), sleep() and time() of a clock that only sleeps (or a test) move on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return EPOCH + self.now
