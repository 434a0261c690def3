"""Concurrent requests for the same thing share one run: one upstream exchange, many waiters."""

from __future__ import annotations

from collections.abc import Coroutine, Hashable
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure


class SingleFlight:
    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[defer.Deferred]] = {}

    def run(self, key: Hashable, make: Callable[[], Coroutine[Any, Any, Any]]) -> defer.Deferred:
        """The result of ``make()``, started only if no run for ``key`` is in progress."""
        out: defer.Deferred = defer.Deferred()
        if key in self._waiters:
            self._waiters[key].append(out)
            return out
        self._waiters[key] = [out]
        defer.ensureDeferred(make()).addBoth(self._fire, key)
        return out

    def _fire(self, result: Any, key: Hashable) -> None:
        for d in self._waiters.pop(key):
            (d.errback if isinstance(result, Failure) else d.callback)(result)
