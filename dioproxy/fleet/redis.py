"""Our thin interface over txredisapi: every call has a deadline, and a Redis that fails is left alone for a while.

txredisapi is Twisted-native (commands are Deferreds on the reactor) but, while Redis is down, a command waits
forever for a connection, and one sent to a stalled Redis waits forever for its reply. So here:

- every call is under :data:`DEADLINE` (waiting for a connection included; a caller with an answer of its own
  without Redis gives a shorter one, :data:`QUICK`) and raises :class:`FleetUnavailable`
  when Redis does not answer in time or loses the connection; at once when the last connection was lost or
  refused and none is up. A call that timed out drops the pool's connections (they are suspect; a half-open one
  would never answer) and txredisapi opens new ones.
- the down-breaker: after such a failure every call raises FleetUnavailable at once, without asking Redis, until
  a background PING (every :data:`DOWN_FOR` seconds) is answered. No client request waits for each deadline, and
  none is used as the probe.
- an error *answered* by Redis (a script error, OOM, READONLY) raises FleetUnavailable too, but leaves the breaker
  closed: Redis answered quickly, so nobody waits by asking it again.
- ``AUTH`` and ``SELECT`` are ours (:class:`_Setup`): txredisapi stops reconnecting for good when they fail, and
  against a paused Redis they time out, so a replica would never rejoin. Here a failed setup drops that one
  connection and reconnection goes on (first after :data:`RECONNECT_FIRST` s, backing off to
  :data:`RECONNECT_CAP`).

A :class:`Subscription` owns a connection of its own (Redis requires it), subscribes again after every reconnection
and PINGs every :data:`KEEPALIVE` seconds so a stalled Redis is noticed. Delivery is at most once: messages
published while it is not subscribed are lost, so ``on_subscribed`` tells the caller to look again at what it
was waiting for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

log = Logger()

#: Deadline of every call, waiting for a connection included (a local Redis answers in well under 1 ms).
DEADLINE = 2.0
#: Deadline of a call made on a client's request path that has an answer of its own without Redis (the rate
#: limits, the pull budget): missing it opens the breaker like any other deadline.
QUICK = 0.5
#: Seconds between PINGs while the breaker is open; at least this long, calls fail fast after a failure.
DOWN_FOR = 3.0
#: Seconds between a subscription's PINGs (how long a stalled Redis can go unnoticed by a subscriber).
KEEPALIVE = 5.0
#: First wait before reconnecting, and the cap of its backoff.
RECONNECT_FIRST, RECONNECT_CAP = 0.1, 2.0
#: Connections per client (commands are pipelined on them).
POOL = 2
#: The start of every key and channel of the fleet's (one Redis can serve several fleets with other prefixes).
PREFIX = "dioproxy:"


class FleetUnavailable(Exception):
    """Redis cannot be relied on for this call (down, stalled, unreachable, or it answered an error): act per
    replica (fill it yourself, check the tag yourself)."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: from ``redis://[[user]:password@]host[:port][/db]``."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """ValueError on anything but a plain ``redis://`` URL (TLS is not supported yet)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a redis://host[:port][/db] URL: {url!r}")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} is not a number")
        port = parts.port or 6379  # ValueError on a bad port
        return cls(
            host=parts.hostname,
            port=port,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}/{self.db}"

    def setup(self, select: bool = True) -> list[tuple[Any, ...]]:
        """The commands a new connection runs before it is used."""
        commands: list[tuple[Any, ...]] = []
        if self.password is not None:
            commands.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if select and self.db:
            commands.append(("SELECT", self.db))
        return commands


class _Setup:
    """Runs the factory's setup commands (AUTH, SELECT) on a new connection before txredisapi marks it usable;
    a failure drops this connection only, so reconnection goes on."""

    factory: Any
    transport: Any

    def connectionMade(self) -> Any:
        if not self.factory.setup:
            return super().connectionMade()
        return defer.ensureDeferred(self._setup())

    async def _setup(self) -> None:
        try:
            for command in self.factory.setup:
                d = self.execute_command(*command)
                await d.addTimeout(self.factory.deadline, self.factory.reactor)
        except Exception as e:
            log.warn("Redis {label}: setting up a connection failed ({e})", label=self.factory.label, e=e)
            self.transport.abortConnection()
            return
        super().connectionMade()


class _Protocol(_Setup, txredisapi.RedisProtocol):
    pass


class _Factory(txredisapi.RedisFactory):
    protocol = _Protocol
    initialDelay, maxDelay = RECONNECT_FIRST, RECONNECT_CAP

    def __init__(self, address: RedisAddress, poolsize: int, deadline: float, reactor: Any) -> None:
        super().__init__(address.label, None, poolsize, isLazy=True, convertNumbers=False)
        self.label, self.setup, self.deadline, self.reactor = address.label, address.setup(), deadline, reactor
        self.unreachable = False  # a connection was lost or refused, and none was made since

    def retryDelay(self, attempt: int) -> float:
        self.unreachable = True  # asked before every reconnection attempt
        return super().retryDelay(attempt)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.unreachable = False


def _endpoint(address: RedisAddress, reactor: Any, deadline: float) -> HostnameEndpoint:
    return HostnameEndpoint(reactor, address.host, address.port, timeout=deadline)


class Redis:
    """A pool of connections to one Redis, with deadlines and the down-breaker. Calls are coroutines."""

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any = None,
        deadline: float = DEADLINE,
        down_for: float = DOWN_FOR,
        poolsize: int = POOL,
        keepalive: float = KEEPALIVE,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.address, self.reactor, self.deadline, self.down_for = address, reactor, deadline, down_for
        self.keepalive = keepalive
        self.down = False  # the breaker is open: calls fail at once
        self.down_since = 0.0
        self.closed = False
        self._probe: Any = None
        self._subscriptions: list[Subscription] = []
        self._factory = _Factory(address, poolsize, deadline, reactor)
        self._factory.startConnecting(_endpoint(address, reactor, deadline))

    @classmethod
    def from_url(cls, url: str, reactor: Any = None, **options: Any) -> Redis:
        return cls(RedisAddress.parse(url), reactor, **options)

    # -- calls -------------------------------------------------------------------------------------------------

    async def call(self, *command: Any, deadline: float | None = None) -> Any:
        """One command (``"SET", key, value, "NX"``): its reply, strings as str, or FleetUnavailable; ``deadline``
        (seconds) shortens the client's own for this call."""
        return await self._ask(command[0], lambda handler: handler.execute_command(*command), deadline)

    async def eval(self, script: str, keys: list[str], args: list[Any], deadline: float | None = None) -> Any:
        """A Lua script (EVALSHA once Redis knows it): its reply, or FleetUnavailable."""
        return await self._ask("EVAL", lambda handler: handler.eval(script, keys, args), deadline)

    async def publish(self, channel: str, message: str) -> int:
        """Publish ``message``; the number of subscribers that got it."""
        return await self.call("PUBLISH", channel, message)

    async def ping(self) -> None:
        await self.call("PING")

    async def _ask(self, what: str, start: Callable[[Any], defer.Deferred], deadline: float | None = None) -> Any:
        if self.closed:
            raise FleetUnavailable(f"Redis {self.address.label}: client closed")
        if self.down:
            since = self.reactor.seconds() - self.down_since
            raise FleetUnavailable(f"Redis {self.address.label} down for {since:.1f} s: {what} not sent")
        return await self._send(what, start, min(deadline or self.deadline, self.deadline))

    async def _send(self, what: str, start: Callable[[Any], defer.Deferred], deadline: float | None = None) -> Any:
        deadline = deadline or self.deadline
        if self._factory.unreachable and not self._factory.pool:
            self._mark_down(f"{what}: not connected")  # refused or lost: no use waiting for the deadline
            raise FleetUnavailable(f"Redis {self.address.label}: not connected, {what} not sent")
        d = start(self._factory.handler)
        d.addTimeout(deadline, self.reactor)
        try:
            return await d
        except txredisapi.ResponseError as e:
            raise FleetUnavailable(f"Redis {self.address.label} answered {what} with an error: {e}") from e
        except defer.TimeoutError as e:
            self._drop_connections()
            self._mark_down(f"no answer to {what} within {deadline:g} s")
            raise FleetUnavailable(f"Redis {self.address.label}: no answer to {what} within {deadline:g} s") from e
        except txredisapi.RedisError as e:  # not connected, connection lost, garbage on the wire
            self._mark_down(f"{what}: {e}")
            raise FleetUnavailable(f"Redis {self.address.label}: {what}: {e}") from e

    # -- the breaker -------------------------------------------------------------------------------------------

    def _drop_connections(self) -> None:
        for connection in list(self._factory.pool):
            with contextlib.suppress(Exception):
                connection.transport.abortConnection()

    def _mark_down(self, why: str) -> None:
        if self.closed:
            return
        if not self.down:
            self.down, self.down_since = True, self.reactor.seconds()
            log.warn(
                "Redis {label} failed ({why}): fleet calls fail at once until it answers a PING (every {s:g} s)",
                label=self.address.label,
                why=why,
                s=self.down_for,
            )
        if self._probe is None or not self._probe.active():
            self._probe = self.reactor.callLater(self.down_for, self._check)

    def _check(self) -> None:
        d = defer.ensureDeferred(self._send("PING", lambda handler: handler.execute_command("PING")))
        d.addCallbacks(self._back, lambda f: f.trap(FleetUnavailable))

    def _back(self, _: Any) -> None:
        if self.closed or not self.down:
            return
        log.info(
            "Redis {label} answers again after {s:.1f} s",
            label=self.address.label,
            s=self.reactor.seconds() - self.down_since,
        )
        self.down = False

    # -- subscriptions and life --------------------------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        on_message: Callable[[str], None],
        on_subscribed: Callable[[], None] | None = None,
    ) -> Subscription:
        """Call ``on_message(message)`` for each message on ``channel``, on a connection of its own."""
        if self.closed:
            raise FleetUnavailable(f"Redis {self.address.label}: client closed")
        subscription = Subscription(
            self.address, channel, on_message, on_subscribed, self.reactor, self.deadline, self.keepalive
        )
        self._subscriptions.append(subscription)
        return subscription

    async def close(self) -> None:
        """Close every connection, subscriptions included; later calls raise FleetUnavailable."""
        self.closed = True
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        for subscription in self._subscriptions:
            await subscription.close()
        await self._factory.disconnect()


class _SubscriberProtocol(_Setup, txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: str, message: Any) -> None:
        self.factory.subscription._message(message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _SubscriberProtocol
    initialDelay, maxDelay = RECONNECT_FIRST, RECONNECT_CAP
    convertNumbers = False

    def __init__(self, subscription: Subscription, address: RedisAddress) -> None:
        super().__init__(isLazy=True)
        self.convertNumbers = False
        self.subscription, self.label, self.setup = subscription, address.label, address.setup(select=False)
        self.deadline, self.reactor = subscription.deadline, subscription.reactor

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.subscription._connected(conn)


class Subscription:
    """One channel, subscribed again after every reconnection; see the module docstring for what is lost."""

    def __init__(
        self,
        address: RedisAddress,
        channel: str,
        on_message: Callable[[str], None],
        on_subscribed: Callable[[], None] | None,
        reactor: Any,
        deadline: float,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.address, self.channel, self.reactor, self.deadline = address, channel, reactor, deadline
        self.on_message, self.on_subscribed = on_message, on_subscribed
        self.subscribed = False
        self._connection: Any = None
        self._waiting: list[defer.Deferred] = []
        self._factory = _SubscriberFactory(self, address)
        self._factory.startConnecting(_endpoint(address, reactor, deadline))
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = reactor
        self._keepalive.start(keepalive, now=False)

    def ready(self) -> defer.Deferred:
        """Fires once subscribed (at once if it is); no deadline of its own: put one on it."""
        if self.subscribed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def _connected(self, connection: Any) -> None:
        self._connection = connection
        connection.whenDisconnected().addCallback(self._disconnected)
        d = connection.subscribe(self.channel).addTimeout(self.deadline, self.reactor)
        d.addCallbacks(lambda _: self._subscribed(connection), lambda f: self._failed(connection, f))

    def _subscribed(self, connection: Any) -> None:
        if connection is not self._connection:
            return
        self.subscribed = True
        if self.on_subscribed is not None:
            try:
                self.on_subscribed()
            except Exception:
                log.failure("on_subscribed of Redis channel {channel}", channel=self.channel)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _failed(self, connection: Any, failure: Any) -> None:
        log.warn(
            "Redis {label}: subscribing to {channel} failed ({e}); reconnecting",
            label=self.address.label,
            channel=self.channel,
            e=failure.getErrorMessage(),
        )
        connection.transport.abortConnection()

    def _disconnected(self, connection: Any) -> None:
        if connection is self._connection:
            self._connection, self.subscribed = None, False

    def _message(self, message: Any) -> None:
        try:
            self.on_message(message)
        except Exception:
            log.failure("handler of Redis channel {channel}", channel=self.channel)

    def _ping(self) -> None:
        """A stalled Redis sends nothing, which looks like a quiet channel: ask it, drop the connection if mute."""
        connection = self._connection
        if connection is None or not self.subscribed:
            return
        d = connection.ping().addTimeout(self.deadline, self.reactor)
        d.addErrback(lambda f: self._failed(connection, f))

    async def close(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()
        for d in self._waiting:
            d.cancel()
        self._waiting = []
        await self._factory.disconnect()
