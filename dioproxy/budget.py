"""The pull budget: how many manifest GETs an upstream still allows each of our accounts, and how we spend them.

Docker Hub counts manifest GETs (HEADs are free) per address when anonymous and per account when signed in, and
says on every manifest answer how many are left: ``ratelimit-limit: 100;w=21600``, ``ratelimit-remaining: 76;w=21600``.
We keep the last word per (registry, account) and spend what is left where it matters most:

- plenty: as usual (tags revalidated by HEAD, a body fetched only when its digest is new);
- low (``pull_budget.reserve`` percent of the limit or fewer left): the rest is kept for images the cache does
  not hold at all; a cached tag whose upstream digest moved is served as it is (stale, with a Warning) instead of
  spending a GET on the new one;
- gone (none left): no manifest GET goes out blind. A free HEAD asks whether the window has freed some; if not, a
  request waits up to ``pull_budget.wait`` for a reset that near, else a cached tag is served stale and anything
  else is answered 429 TOOMANYREQUESTS with the upstream's reset time, and the log names the account that ran dry.

Identical requests share one upstream exchange already (:class:`~dioproxy.singleflight.SingleFlight` in
:mod:`dioproxy.manifests`). Budgets live in memory, per process: an announcement older than its window says
nothing any more, so a restart or a quiet hour loses nothing worth keeping. With ``coordination`` the replicas
pull from one budget per account, so they share it (:mod:`dioproxy.fleet.budget`): the newest announcement any
of them heard and the GETs all of them have in flight; Redis unavailable, each goes by what it heard itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.task import deferLater
from twisted.logger import Logger

from dioproxy.errors import UpstreamError

log = Logger()

#: ``76;w=21600`` → 76 and the window in seconds.
_ANNOUNCED = re.compile(r"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")
#: Come back after this long when a 429 named no time and no window is known.
DEFAULT_RETRY = 60.0


def parse_announcement(value: str | None) -> tuple[int | None, float | None]:
    """``ratelimit-remaining: 98;w=21600`` → (98, 21600.0); (None, None) when absent or unreadable."""
    match = _ANNOUNCED.match(value or "")
    if not match:
        return None, None
    return int(match.group(1)), float(match.group(2)) if match.group(2) else None


@dataclass
class Allowance:
    """What one registry last said about one of our accounts (``anonymous`` or the configured username)."""

    registry: str
    account: str
    remaining: int | None = None
    limit: int | None = None
    window: float | None = None
    seen: float = 0.0  # when it was said (Unix time)
    retry_at: float | None = None  # a 429's Retry-After, as a time
    inflight: int = 0  # GETs sent and not answered yet: spent, though no announcement counts them yet
    elsewhere: int = 0  # the same, sent by the other replicas (as Redis said at the last look; 0 without a fleet)

    def observe(self, code: int, headers: Any, now: float) -> bool:
        """Read an answer's ``ratelimit-*`` headers; True if the budget just ran out (said once per exhaustion)."""
        remaining, window = parse_announcement(_first(headers, "ratelimit-remaining"))
        if remaining is None:
            return False
        was = self.left(now)
        self.remaining, self.window, self.seen = remaining, window, now
        self.limit = parse_announcement(_first(headers, "ratelimit-limit"))[0] or self.limit
        retry = _seconds(_first(headers, "Retry-After"))
        if code == 429 or remaining == 0:
            self.remaining = 0
            self.retry_at = now + retry if retry is not None else self.retry_at
        else:
            self.retry_at = None
        return self.remaining == 0 and was != 0

    def left(self, now: float) -> int | None:
        """GETs we may still send; None when unknown (nothing said yet, or said longer than a window ago)."""
        if self.remaining is None or (self.window and now - self.seen > self.window):
            return None
        if self.remaining == 0 and self.retry_at is not None and now >= self.retry_at:
            return None  # the upstream's own reset time has passed: ask again
        return max(0, self.remaining - self.inflight - self.elsewhere)

    def said(self) -> dict[str, Any]:
        """The last announcement, for the other replicas (:meth:`adopt`)."""
        return {k: getattr(self, k) for k in _SAID}

    def adopt(self, said: Any) -> bool:
        """Take another replica's announcement if it is newer than ours; False if not, or not one of ours."""
        if not isinstance(said, dict) or not all(isinstance(said.get(k), _SAID[k]) for k in _SAID):
            return False
        if said["seen"] <= self.seen or said["remaining"] is None:
            return False
        for k in _SAID:
            setattr(self, k, said[k])
        return True

    def retry_in(self, now: float) -> float:
        """Seconds until a GET is likely allowed again: the 429's Retry-After; else, in a sliding window, the time
        one pull takes to age out on average (window / limit); else :data:`DEFAULT_RETRY`."""
        if self.retry_at is not None:
            return max(0.0, self.retry_at - now)
        if self.window and self.limit:
            return self.window / self.limit
        return DEFAULT_RETRY


class SharedBudgets(Protocol):
    """The fleet's view of every budget (:class:`~dioproxy.fleet.budget.FleetBudget`); never raises, never hangs."""

    async def refresh(self, allowance: Allowance) -> None: ...
    def share(self, allowance: Allowance) -> None: ...
    async def sent(self, allowance: Allowance) -> str | None: ...
    def answered(self, allowance: Allowance, member: str) -> None: ...


class PullBudget:
    """Every account's :class:`Allowance`, and the policy for spending them (``pull_budget`` in the config)."""

    def __init__(self, reactor: Any, clock: Callable[[], float], reserve: float = 20.0, wait: float = 5.0) -> None:
        #: With ``coordination``, the fleet's view of every budget.
        self.fleet: SharedBudgets | None = None
        self.reactor = reactor
        self.clock = clock
        self.reserve = reserve  # percent of the limit
        self.wait = wait
        self.allowances: dict[tuple[str, str], Allowance] = {}
        #: ``f(registry, account, action)`` for each decision the budget made: held | waited | refused.
        self.on_action: Callable[[str, str, str], None] | None = None

    def of(self, registry: str, account: str) -> Allowance:
        key = (registry, account)
        if key not in self.allowances:
            self.allowances[key] = Allowance(registry, account)
        return self.allowances[key]

    def observe(self, allowance: Allowance, code: int, headers: Any) -> None:
        """Every upstream answer for ``allowance``'s account (``UpstreamClient`` calls this)."""
        now, seen = self.clock(), allowance.seen
        ran_out = allowance.observe(code, headers, now)
        if self.fleet is not None and allowance.seen != seen:
            self.fleet.share(allowance)
        if ran_out:
            log.warn(
                "upstream {registry} ({account}): pull rate limit used up ({limit} per {window}); manifests the "
                "cache lacks are refused with 429 for about {retry:.0f} s, cached tags are served as they are",
                registry=allowance.registry,
                account=allowance.account,
                limit=allowance.limit if allowance.limit is not None else "?",
                window=_window(allowance.window),
                retry=allowance.retry_in(now),
            )

    def state(self, allowance: Allowance) -> str:
        """unknown | plenty | low | gone."""
        left = allowance.left(self.clock())
        if left is None:
            return "unknown"
        if left <= 0:
            return "gone"
        if allowance.limit and left <= math.ceil(allowance.limit * self.reserve / 100):
            return "low"
        return "plenty"

    async def holding(self, allowance: Allowance) -> bool:
        """Whether a cached tag should be served as it is rather than spend a GET on its new digest."""
        await self.look(allowance)
        return self.state(allowance) in ("low", "gone")

    async def look(self, allowance: Allowance) -> None:
        """With a fleet, take in what the other replicas heard and have in flight (never raises, never hangs)."""
        if self.fleet is not None:
            await self.fleet.refresh(allowance)

    @asynccontextmanager
    async def spending(self, allowance: Allowance, probe: Callable[[], Awaitable[Any]]) -> AsyncIterator[None]:
        """Around one manifest GET: lets it go, counted in flight until it is answered; when the budget is gone,
        first ``probe()`` (a free HEAD: its answer brings a fresh announcement), then waits for a reset within
        ``wait``, else raises :class:`UpstreamError` 429 with the reset as Retry-After."""
        await self.look(allowance)
        if self.state(allowance) == "gone":
            await self._until_allowed(allowance, probe)
        allowance.inflight += 1
        sent = None
        try:
            if self.fleet is not None:
                sent = await self.fleet.sent(allowance)
            yield
        except UpstreamError as e:
            if e.status == 429 and self.state(allowance) == "gone":  # the upstream said so first: say it plainly
                raise self.refusal(allowance, allowance.retry_in(self.clock())) from None
            raise
        finally:
            allowance.inflight -= 1
            if sent is not None:
                self.fleet.answered(allowance, sent)

    async def _until_allowed(self, allowance: Allowance, probe: Callable[[], Awaitable[Any]]) -> None:
        """Returns once a probe found pulls left (after waiting for a reset due within ``wait``), else refuses."""
        await probe()
        if self.state(allowance) != "gone":
            return
        delay = allowance.retry_in(self.clock())
        if delay <= self.wait:
            self.note(allowance, "waited")
            await deferLater(self.reactor, delay, lambda: None)
            await probe()
            if self.state(allowance) != "gone":
                return
            delay = allowance.retry_in(self.clock())
        self.note(allowance, "refused")
        raise self.refusal(allowance, delay)

    def refusal(self, allowance: Allowance, delay: float) -> UpstreamError:
        who = "anonymous pulls" if allowance.account == "anonymous" else f"account {allowance.account}"
        reason = (
            f"pull rate limit used up for {who} ({allowance.limit if allowance.limit is not None else '?'} per "
            f"{_window(allowance.window)}); try again in {math.ceil(delay)} s"
            + (" or configure credentials for this upstream" if allowance.account == "anonymous" else "")
        )
        return UpstreamError(allowance.registry, reason, 429, str(max(1, math.ceil(delay))))

    def snapshot(self) -> list[dict[str, Any]]:
        """Every account we have heard about: the status page and ``/metrics``."""
        now = self.clock()
        return [
            {
                "registry": a.registry,
                "account": a.account,
                "remaining": a.left(now),
                "limit": a.limit,
                "window": a.window,
                "at": a.seen or None,
                "state": self.state(a),
                "retry_in": round(a.retry_in(now)) if self.state(a) == "gone" else None,
            }
            for a in self.allowances.values()
            if a.remaining is not None
        ]

    def note(self, allowance: Allowance, action: str) -> None:
        """Count a decision: held (a cached tag served instead of a GET), waited (for a reset), refused (429)."""
        if self.on_action:
            self.on_action(allowance.registry, allowance.account, action)


#: What :meth:`Allowance.said` tells the other replicas, and the types each field may have.
_SAID: dict[str, Any] = {
    "remaining": (int, type(None)),
    "limit": (int, type(None)),
    "window": (int, float, type(None)),
    "seen": (int, float),
    "retry_at": (int, float, type(None)),
}


def _first(headers: Any, name: str) -> str | None:
    values = headers.getRawHeaders(name) if headers is not None else None
    return values[0] if values else None


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from registries; the estimate serves
    return seconds if seconds is not None and 0 <= seconds < 86400 * 7 else None


def _window(window: float | None) -> str:
    if not window:
        return "window"
    return f"{window / 3600:g} h" if window >= 3600 else f"{window:g} s"
