"""Per-deployment limits on what the mirror serves and to whom: repository rules and a per-client rate limit."""

from __future__ import annotations

import ipaddress
from fnmatch import fnmatchcase
from typing import Callable

from dioproxy.config import AccessRule
from dioproxy.errors import RegistryError
from dioproxy.routing import Target


def check_access(rules: dict[str, AccessRule], target: Target) -> None:
    """403 DENIED unless the repository passes its registry's rules (deny wins; an allow list must match)."""
    rule = rules.get(target.registry)
    if rule is None:
        return
    name = target.name
    denied = any(fnmatchcase(name, p) for p in rule.deny)
    if denied or (rule.allow and not any(fnmatchcase(name, p) for p in rule.allow)):
        raise RegistryError(403, "DENIED", f"{target.registry}/{name} is not served by this mirror")


class ClientAddresses:
    """Who a request comes from, behind nginx too: for the rate limit and the access log."""

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def of(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: ``X-Forwarded-For`` counts only when it comes from a trusted proxy."""
        address = peer
        hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
        while hops and self.trusts(address):
            address = hops.pop()
        return address

    def trusts(self, address: str) -> bool:
        """Whether ``address`` is one of ``rate_limit.trusted_proxies``, whose X-Forwarded-* headers we believe."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)


class RateLimiter:
    """A token bucket per client address: ``rate`` requests per second, bursts up to ``burst``; this process's own
    (with ``coordination``, :class:`~dioproxy.fleet.limits.FleetRateLimiter` keeps the buckets in Redis)."""

    MAX_CLIENTS = 100_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    async def retry_after(self, client: str) -> float:
        """0 if the request may go now (and is counted), else seconds until it may (a coroutine, as the fleet's)."""
        now = self.clock()
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            if len(self._buckets) >= self.MAX_CLIENTS:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate
