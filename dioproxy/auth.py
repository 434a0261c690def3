"""Closing the mirror to strangers: htpasswd users, our own short-lived tokens, the Bearer challenge.

Clients do what they do with Docker Hub: ``docker login`` / ``podman login`` meet a ``401`` with
``WWW-Authenticate: Bearer realm="<us>/token"``, fetch a token there with Basic credentials, and send it as
``Authorization: Bearer``. Basic credentials sent straight to ``/v2/`` are accepted too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import bcrypt

from dioproxy.errors import RegistryError
from dioproxy.pools import BlockingPool, PoolTimeout
from dioproxy.singleflight import SingleFlight

SERVICE = "dioproxy"
_BCRYPT_PREFIXES = (b"$2y$", b"$2a$", b"$2b$")


class HtpasswdError(ValueError):
    pass


def read_htpasswd(path: str) -> dict[str, bytes]:
    """Users and bcrypt hashes from an ``htpasswd -B`` file; anything else is refused (:class:`HtpasswdError`)."""
    users: dict[str, bytes] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            user, sep, hashed = line.partition(b":")
            if not sep or not hashed.startswith(_BCRYPT_PREFIXES):
                raise HtpasswdError(f"{path}:{number}: only bcrypt entries (htpasswd -B) are accepted")
            users[user.decode()] = hashed
    if not users:
        raise HtpasswdError(f"{path}: no users")
    return users


class Htpasswd:
    """The users of an htpasswd file; bcrypt runs in the mirror's ``auth`` pool, never on the reactor and never in
    Twisted's default pool (its name resolver would queue behind a burst of logins)."""

    #: How long a verified (user, password) pair is remembered, so a burst of pulls costs one bcrypt check.
    REMEMBER = 300.0

    def __init__(self, path: str, pool: BlockingPool, clock: Callable[[], float] = time.monotonic) -> None:
        self.users = read_htpasswd(path)
        self.pool = pool
        # Unknown users are checked against a real user's hash (the same cost, so the same time) and then refused:
        # the answer's timing does not tell which users exist, and nothing is hashed on the reactor at start.
        self._stand_in = next(iter(self.users.values()))
        self._verified: dict[bytes, float] = {}
        self._clock = clock

    @staticmethod
    def key(user: str, password: str) -> bytes:
        """What a credential is known by here: its hash, never the password itself."""
        return hashlib.sha256(f"{user}\0{password}".encode()).digest()

    def remembered(self, user: str, password: str) -> bool:
        """Verified by bcrypt within the last :attr:`REMEMBER` seconds (no thread needed)."""
        return self._verified.get(self.key(user, password), 0) > self._clock()

    async def check(self, user: str, password: str) -> bool:
        if self.remembered(user, password):
            return True
        hashed = self.users.get(user, self._stand_in)
        ok = await self.pool.run(bcrypt.checkpw, password.encode(), hashed)
        if ok and user in self.users:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[self.key(user, password)] = self._clock() + self.REMEMBER
            return True
        return False


class LoginThrottle:
    """Failed logins per client: past ``limit`` in ``window`` seconds the client is refused at once, with no bcrypt.

    A check in progress counts as a failure until it succeeds, so a burst of concurrent wrong passwords costs at
    most ``limit`` bcrypt checks, not one each. This process's own; with ``coordination`` the counts are the
    fleet's (:class:`~dioproxy.fleet.limits.FleetLoginThrottle`): the methods are coroutines for that.
    """

    #: Clients tracked at most; past it, expired windows are dropped (and if none, all: memory stays bounded).
    MAX_CLIENTS = 100_000

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures, end of its window)

    async def retry_after(self, client: str) -> float:
        """Seconds the client must wait before its next login is checked; 0: check it now."""
        entry = self._failures.get(client)
        if entry is None:
            return 0.0
        now = self._clock()
        if entry[1] <= now:
            del self._failures[client]
            return 0.0
        return entry[1] - now if entry[0] >= self.limit else 0.0

    async def attempt(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= self.MAX_CLIENTS:
            now = self._clock()
            self._failures = {c: e for c, e in self._failures.items() if e[1] > now}
            if len(self._failures) >= self.MAX_CLIENTS:
                self._failures.clear()
        count, until = self._failures.get(client, (0, self._clock() + self.window))
        self._failures[client] = (count + 1, until)

    async def succeeded(self, client: str) -> None:
        entry = self._failures.get(client)
        if entry is not None:
            self._failures[client] = (entry[0] - 1, entry[1])


class Throttle(Protocol):
    """What :class:`Gate` asks about failed logins: :class:`LoginThrottle` or the fleet's
    :class:`~dioproxy.fleet.limits.FleetLoginThrottle`."""

    async def retry_after(self, client: str) -> float: ...
    async def attempt(self, client: str) -> None: ...
    async def succeeded(self, client: str) -> None: ...


@dataclass(frozen=True)
class Grant:
    user: str
    repositories: frozenset[str] | None  # None: every repository (Basic credentials)
    registry: str | None = None  # the registry a token is for; None: any (Basic credentials)

    def allows(self, name: str) -> bool:
        return self.repositories is None or name in self.repositories


class Tokens:
    """HMAC-signed tokens naming a user, the registry and the repositories it may pull there, and an expiry."""

    def __init__(self, secret: str, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.key = secret.encode()
        self.ttl = ttl
        self.clock = clock

    def issue(self, user: str, registry: str, repositories: list[str]) -> dict:
        now = self.clock()
        claims = {"sub": user, "reg": registry, "repos": repositories, "exp": now + self.ttl}
        payload = _b64(json.dumps(claims).encode())
        token = f"{payload}.{self._sign(payload)}"
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": token, "access_token": token, "expires_in": int(self.ttl), "issued_at": issued}

    def verify(self, token: str) -> Grant | None:
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            if claims["exp"] < self.clock():
                return None
            return Grant(str(claims["sub"]), frozenset(claims["repos"]), str(claims["reg"]))
        except (ValueError, KeyError, TypeError):
            return None

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        user, sep, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def scope_repositories(scopes: list[str]) -> list[str]:
    """Repository names from ``scope=repository:NAME:pull`` parameters (push is never granted)."""
    names = []
    for scope in scopes:
        for part in scope.split(" "):
            kind, _, rest = part.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name and "pull" in actions.split(","):
                names.append(name)
    return names


class Gate:
    """Decides who a request comes from; raises the 401 that starts a client's login dance."""

    def __init__(self, htpasswd: Htpasswd, tokens: Tokens, throttle: Throttle | None = None) -> None:
        self.htpasswd = htpasswd
        self.tokens = tokens
        self.throttle: Throttle = throttle or LoginThrottle()
        self._checks = SingleFlight()  # concurrent requests with the same credentials wait for one bcrypt check

    async def grant(self, authorization: str | None, realm: str, name: str | None, client: str) -> Grant:
        if authorization and authorization[:7].lower() == "bearer ":
            grant = self.tokens.verify(authorization[7:].strip())
            if grant is not None and (name is None or grant.allows(name)):
                return grant
            raise self.challenge(realm, name, "insufficient_scope" if grant else "invalid_token")
        credentials = basic_credentials(authorization)
        if credentials and await self._check(credentials, client):
            return Grant(credentials[0], None)
        raise self.challenge(realm, name, "invalid_credentials" if credentials else None)

    async def login(self, authorization: str | None, client: str) -> str:
        """The user behind ``/token``'s Basic credentials; 401 otherwise."""
        credentials = basic_credentials(authorization)
        if credentials and await self._check(credentials, client):
            return credentials[0]
        raise RegistryError(
            401, "UNAUTHORIZED", "authentication required", headers={"WWW-Authenticate": f'Basic realm="{SERVICE}"'}
        )

    async def _check(self, credentials: tuple[str, str], client: str) -> bool:
        """bcrypt, unless remembered; 429 for a client past its failed logins (remembered ones still pass)."""
        if self.htpasswd.remembered(*credentials):
            return True
        wait = await self.throttle.retry_after(client)
        if wait:
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                "too many failed logins from this client",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return await self._checks.run(Htpasswd.key(*credentials), lambda: self._verify(credentials, client))

    async def _verify(self, credentials: tuple[str, str], client: str) -> bool:
        await self.throttle.attempt(client)
        try:
            ok = await self.htpasswd.check(*credentials)
        except PoolTimeout:
            raise RegistryError(
                503, "UNAVAILABLE", "logins are being checked too slowly; try again", headers={"Retry-After": "5"}
            ) from None
        if ok:
            await self.throttle.succeeded(client)
        return ok

    def challenge(self, realm: str, name: str | None, error: str | None) -> RegistryError:
        header = f'Bearer realm="{realm}",service="{SERVICE}"'
        if name:
            header += f',scope="repository:{name}:pull"'
        if error:
            header += f',error="{error}"'
        return RegistryError(401, "UNAUTHORIZED", "authentication required", headers={"WWW-Authenticate": header})
