"""Waiting for a condition on the dev cluster by polling it, with a deadline."""

import time


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1, error: type = AssertionError):
    """Poll ``predicate`` until it returns a truthy value (returned), or raise ``error`` once
    ``timeout`` seconds have passed; the message names ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise error(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)
