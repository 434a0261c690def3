"""Talking to upstream registries through treq: auth challenges, token cache, redirects, retries.

One :class:`UpstreamClient` per configured registry, all sharing one persistent connection pool. Callers ask for a
path and get a treq response whose body is still unread, so blobs can be streamed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from base64 import b64encode
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlencode, urljoin, urlsplit

from treq.client import HTTPClient
from twisted.internet import defer, error, interfaces, protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.iweb import IResponse
from zope.interface import implementer

from dioproxy.budget import Allowance, PullBudget
from dioproxy.config import Config, Upstream
from dioproxy.egress import InternalAddress
from dioproxy.errors import UpstreamError
from dioproxy.health import Health
from dioproxy.singleflight import SingleFlight

log = Logger()

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
RETRY_STATUSES = {500, 502, 503, 504}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_NETWORK_ERRORS = (
    error.ConnectError,
    error.ConnectingCancelledError,
    error.ConnectionLost,
    error.ConnectionClosed,
    error.DNSLookupError,
    error.TimeoutError,
    defer.CancelledError,
    webclient.ResponseNeverReceived,
    webclient.ResponseFailed,
    webclient.RequestTransmissionFailed,
)


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``WWW-Authenticate: Bearer realm="…",service="…",scope="…"`` (quoted commas allowed)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {}
    for key, value in _CHALLENGE_PARAM.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return Challenge(scheme.lower(), params)


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def _cancelled(e: Exception) -> bool:
    """Whether a request failed because it was cancelled (by treq's timeout, or by whoever awaited it)."""
    if isinstance(e, webclient.ResponseNeverReceived):
        return any(reason.check(defer.CancelledError) for reason in e.reasons)
    return isinstance(e, (defer.CancelledError, error.ConnectingCancelledError))


class IdleDeadline(protocol.Protocol):
    """Hands an upstream body to ``inner`` and drops the connection when no chunk came for ``timeout`` seconds.

    Every body read from an :class:`UpstreamClient` response goes through one (manifests, tags, referrers, tokens,
    blob fills, the pass-through pipe), so a stalled upstream fails its readers instead of holding them forever.
    The clock stops while the body's consumer has paused it (a slow client of the pass-through pipe): that wait is
    the client's deadline, not the upstream's. The inner protocol then sees a failure of :class:`UpstreamError`.
    """

    def __init__(self, inner: protocol.Protocol, reactor: Any, timeout: float, registry: str, url: str) -> None:
        self.inner = inner
        self.reactor = reactor
        self.timeout = timeout
        self.registry = registry
        self.url = url
        self.paused = False
        self.stalled = False
        self.ended = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.arm()
        self.inner.makeConnection(_PauseAware(transport, self))

    def arm(self) -> None:
        if self.ended or self.paused:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        else:
            self._timer = self.reactor.callLater(self.timeout, self._stall)

    def disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stall(self) -> None:
        log.warn("upstream {url}: no body bytes for {s:g} s; dropping the connection", url=self.url, s=self.timeout)
        self.stalled = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.arm()
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.ended = True
        self.disarm()
        if self.stalled:
            reason = Failure(UpstreamError(self.registry, f"body stalled for {self.timeout:g} s"))
        self.inner.connectionLost(reason)


@implementer(interfaces.IPushProducer)
class _PauseAware:
    """The body's transport as its reader sees it: pausing it stops the idle clock, resuming restarts it."""

    def __init__(self, transport: Any, deadline: IdleDeadline) -> None:
        self._transport = transport
        self._deadline = deadline

    def pauseProducing(self) -> None:
        self._deadline.paused = True
        self._deadline.disarm()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._deadline.paused = False
        self._deadline.arm()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _TimedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """An upstream response whose body, whoever reads it, is read under an :class:`IdleDeadline`."""

    def __init__(self, original: IResponse, client: UpstreamClient, url: str) -> None:
        super().__init__(original)
        self._client = client
        self._url = url

    def deliverBody(self, inner: protocol.Protocol) -> None:
        client = self._client
        self.original.deliverBody(IdleDeadline(inner, client.reactor, client.timeout, client.registry, self._url))


class _Discard(protocol.Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


def discard(response: IResponse) -> defer.Deferred:
    """Drop a response body we do not want, so its connection can go back to the pool."""
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Discard(done))
    return done


class _Abandon(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def abandon(response: IResponse) -> None:
    """Close a response's connection without reading its body (a blob we will not use)."""
    response.deliverBody(_Abandon())


class _Limited(protocol.Protocol):
    def __init__(self, limit: int, done: defer.Deferred) -> None:
        self.limit, self.done, self.parts, self.size = limit, done, [], 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(ValueError(f"body larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason.check(webclient.ResponseDone, webclient.PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_limited(response: IResponse, limit: int) -> defer.Deferred:
    """The whole body, refused (ValueError) past ``limit`` bytes so a hostile upstream cannot fill our memory."""
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Limited(limit, done))
    return done


class TokenCache:
    """Bearer tokens per (realm, service, scope, credential identity), kept until shortly before they expire.

    The identity (:func:`identity`) is part of the key, so a token fetched with credentials never serves a request
    made without them or with others. Least recently used tokens go past ``max_entries``: scopes name repositories
    that clients choose, and must not grow our memory without bound.
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_entries: int = 10_000) -> None:
        self._tokens: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        self._clock = clock
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: tuple) -> str | None:
        entry = self._tokens.get(key)
        if entry and entry[1] > self._clock():
            self._tokens.move_to_end(key)
            return entry[0]
        self._tokens.pop(key, None)
        return None

    def drop(self, key: tuple) -> None:
        self._tokens.pop(key, None)

    def forget(self, who: str) -> None:
        """Drop every token fetched with the credentials of this identity (they changed on a reload)."""
        for key in [key for key in self._tokens if key[-1] == who]:
            del self._tokens[key]

    def put(self, key: tuple, token: str, expires_in: float) -> None:
        margin = min(10.0, expires_in / 4)
        self._tokens[key] = (token, self._clock() + expires_in - margin)
        self._tokens.move_to_end(key)
        while len(self._tokens) > self.max_entries:
            self._tokens.popitem(last=False)


def identity(credentials: tuple[str, str] | None) -> str:
    """Who tokens are fetched as: "anonymous", or a hash of the username and password (never the password)."""
    if credentials is None:
        return "anonymous"
    return hashlib.sha256("\0".join(credentials).encode()).hexdigest()


class UpstreamClient:
    """Requests to one registry, authenticated the way the registry asks."""

    def __init__(
        self,
        upstream: Upstream,
        http: HTTPClient,
        reactor: Any,
        tokens: TokenCache | None = None,
        *,
        public_http: HTTPClient,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.25,
        on_response: Callable[[str, str, int, IResponse], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
        health: Health | None = None,
        budget: PullBudget | None = None,
    ) -> None:
        self.upstream = upstream
        self.http = http
        #: For hops to hosts other than the upstream's own (redirects, token realms): public addresses only.
        self.public_http = public_http
        self.reactor = reactor
        self.tokens = tokens if tokens is not None else TokenCache()  # an empty cache is falsy
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.on_response = on_response
        self.on_error = on_error
        self.health = health or Health(reactor)
        #: The pull budget of the account we are signed in as (its announcements are read off every answer).
        self.budget = budget or PullBudget(reactor, time.time)
        self.allowance: Allowance = self.budget.of(upstream.registry, upstream.username or "anonymous")
        self._challenge: Challenge | None = None
        self._token_flights = SingleFlight()

    @property
    def registry(self) -> str:
        return self.upstream.registry

    # -- public -------------------------------------------------------------------------------------------------

    async def request(self, method: str, path: str, name: str | None = None, headers: dict | None = None) -> IResponse:
        """``method`` ``path`` on the upstream, with auth, redirects and retries; the body is left unread.

        Raises :class:`UpstreamError` when the registry cannot be reached or keeps failing with 5xx or 429, and at
        once (:class:`~dioproxy.health.Offline`) while :mod:`dioproxy.health` has it offline after such a failure.
        """
        url = self.upstream.url + path
        self.health.check(self.registry, self.probe)
        for attempt in range(self.retries + 1):
            started = self.reactor.seconds()
            try:
                response = await self._authorized(method, url, name, dict(headers or {}))
            except _NETWORK_ERRORS as e:
                if _cancelled(e) and self.reactor.seconds() - started < self.timeout:
                    # Our caller gave up before our deadline: not the registry's failure, not retried.
                    raise defer.CancelledError(f"request to {self.registry} cancelled") from e
                reason = f"{type(e).__name__}: {e}"
                if self.on_error:
                    self.on_error(self.registry, reason)
                # A registry silent for a whole timeout will not answer the next attempt either: no retry, so a
                # black hole costs the first request one timeout, not one per attempt (then the offline window).
                silent = _cancelled(e)
                if attempt == self.retries or silent or self.health.offline(self.registry):
                    self.health.failed(self.registry, reason)
                    raise UpstreamError(self.registry, reason) from None
                log.info(
                    "upstream {registry} {method} {path}: {reason}; retrying",
                    registry=self.registry,
                    method=method,
                    path=path,
                    reason=reason,
                )
            else:
                if response.code == 429:
                    await discard(response)
                    raise UpstreamError(self.registry, "rate limited (429)", 429, header(response, "Retry-After"))
                if response.code not in RETRY_STATUSES:
                    self.health.succeeded(self.registry)
                    return response
                await discard(response)
                if attempt == self.retries:
                    self.health.failed(self.registry, f"HTTP {response.code}")
                    raise UpstreamError(self.registry, f"HTTP {response.code}", response.code)
                log.info(
                    "upstream {registry} {method} {path}: HTTP {code}; retrying",
                    registry=self.registry,
                    method=method,
                    path=path,
                    code=response.code,
                )
            await deferLater(self.reactor, self.backoff * 4**attempt, lambda: None)
        raise AssertionError("unreachable")

    async def probe(self) -> int:
        """Whether the registry answers: the status of one ``HEAD /v2/`` (no auth, no redirects, no retries), and
        when that asks for Bearer tokens, of one anonymous token request too (a registry whose token service is
        down serves nobody)."""
        response = await self.http.request(
            "HEAD", self.upstream.url + "/v2/", allow_redirects=False, unbuffered=True, timeout=self.timeout
        )
        if self.on_response:
            self.on_response(self.registry, "HEAD", response.code, response)
        await discard(response)
        challenge = parse_challenge(header(response, "WWW-Authenticate") or "") if response.code == 401 else None
        realm = challenge.params.get("realm", "") if challenge and challenge.scheme == "bearer" else ""
        if urlsplit(realm).scheme not in ("http", "https"):
            return response.code
        service = challenge.params.get("service")
        url = realm + (("&" if "?" in realm else "?") + urlencode({"service": service}) if service else "")
        token = await self._follow("GET", url, {})
        await discard(token)
        return token.code

    async def token(self, scope: str, anonymous: bool = False) -> dict:
        """A token answer from this registry's realm, for the seed-compatible ``/token`` endpoint.

        With ``anonymous`` our credentials are not used: the token goes to a client.
        """
        challenge = self._challenge or await self._discover_challenge()
        if challenge is None or challenge.scheme != "bearer":
            raise UpstreamError(self.registry, "registry does not use token authentication", 404)
        params = dict(challenge.params, scope=scope)
        if anonymous:
            return await self._token_request(params.get("realm", ""), None, params, credentials=False)
        return await self._fetch_token(params)

    # -- auth ------------------------------------------------------------------------------------------------------

    def _scope(self, name: str | None) -> str | None:
        return f"repository:{name}:pull" if name else None

    def _token_key(self, challenge: Challenge, scope: str | None) -> tuple:
        return (challenge.params.get("realm"), challenge.params.get("service"), scope, self._identity())

    def _identity(self) -> str:
        return identity(self.upstream.credentials)

    async def _auth_header(self, name: str | None) -> str | None:
        """The Authorization we can send up front, learnt from earlier challenges (saves a 401 round trip)."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        if challenge.scheme != "bearer":
            return None
        scope = self._scope(name) or challenge.params.get("scope")
        cached = self.tokens.get(self._token_key(challenge, scope))
        if cached is None:
            params = dict(challenge.params)
            params.pop("scope", None)
            if scope:
                params["scope"] = scope
            cached = (await self._fetch_token(params))["token"]
        return f"Bearer {cached}"

    def _basic(self) -> str | None:
        creds = self.upstream.credentials
        if not creds:
            return None
        return "Basic " + b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()

    async def _authorized(self, method: str, url: str, name: str | None, headers: dict) -> IResponse:
        auth = await self._auth_header(name)
        if auth:
            headers["Authorization"] = auth
        response = await self._follow(method, url, headers)
        if response.code != 401:
            return response
        challenge = parse_challenge(header(response, "WWW-Authenticate") or "")
        await discard(response)
        if challenge is None or challenge.scheme not in ("bearer", "basic"):
            return await self._follow(method, url, {k: v for k, v in headers.items() if k != "Authorization"})
        self._challenge = challenge
        if challenge.scheme == "basic":
            retry_auth = self._basic()
        else:
            # The registry refused what we sent: forget it, whether it was predicted or answered to a challenge.
            self.tokens.drop(self._token_key(challenge, self._scope(name)))
            self.tokens.drop(self._token_key(challenge, challenge.params.get("scope")))
            token = await self._fetch_token(challenge.params)
            retry_auth = f"Bearer {token['token']}"
        if retry_auth is None or retry_auth == auth:
            return await self._follow(method, url, headers)
        headers["Authorization"] = retry_auth
        return await self._follow(method, url, headers)

    async def _discover_challenge(self) -> Challenge | None:
        response = await self._follow("GET", self.upstream.url + "/v2/", {})
        await discard(response)
        if response.code == 401:
            self._challenge = parse_challenge(header(response, "WWW-Authenticate") or "")
        return self._challenge

    async def _fetch_token(self, params: dict[str, str]) -> dict:
        """One token request per (realm, service, scope) at a time; concurrent callers share it."""
        realm = params.get("realm", "")
        key = (realm, params.get("service"), params.get("scope"), self._identity())
        cached = self.tokens.get(key)
        if cached:
            return {"token": cached}
        return await self._token_flights.run(key, lambda: self._token_request(realm, key, params))

    async def _token_request(
        self, realm: str, key: tuple | None, params: dict[str, str], credentials: bool = True
    ) -> dict:
        """Ask the realm for a token; cache it under ``key`` (None: a token for someone else, not kept)."""
        if urlsplit(realm).scheme not in ("http", "https"):
            raise UpstreamError(self.registry, f"token realm is not an http(s) URL: {realm[:100]!r}")
        query = {k: v for k, v in params.items() if k in ("service", "scope") and v}
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {}
        basic = self._basic() if credentials else None
        if basic:
            headers["Authorization"] = basic
        started = self.reactor.seconds()
        try:
            response = await self._follow("GET", url, headers)
            body = await read_limited(response, 1 << 20)
        except _NETWORK_ERRORS as e:
            if _cancelled(e) and self.reactor.seconds() - started < self.timeout:
                raise defer.CancelledError("token request cancelled") from e  # our caller gave up: no failure
            reason = f"token service unreachable: {type(e).__name__}"
            self.health.failed(self.registry, reason)  # without tokens the registry serves nobody: offline
            raise UpstreamError(self.registry, reason) from None
        if response.code != 200:
            raise UpstreamError(self.registry, f"token service answered HTTP {response.code}", response.code)
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            expires_in = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamError(self.registry, "token service answered something that is not a token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamError(self.registry, "token service answered no token")
        if key is not None:
            self.tokens.put(key, token, expires_in)
        answer.setdefault("token", token)
        answer.setdefault("expires_in", int(expires_in))
        return answer

    # -- transport ------------------------------------------------------------------------------------------------

    async def _follow(self, method: str, url: str, headers: dict) -> IResponse:
        """Send and follow redirects ourselves, hop by hop.

        ``Authorization`` stays with the origin: never to another host (Docker Hub's CDN), never over plain http
        after https. A host other than the upstream's own and its ``redirect_hosts`` is reached only at a public
        address (:mod:`dioproxy.egress`): an upstream's redirect must not make us read internal services.
        """
        origin = urlsplit(url)
        for _ in range(MAX_REDIRECTS + 1):
            http = self.http if self._trusted(urlsplit(url).hostname) else self.public_http
            try:
                response = await http.request(
                    method, url, headers=headers, allow_redirects=False, unbuffered=True, timeout=self.timeout
                )
            except InternalAddress as e:
                log.warn("upstream {registry}: not following it to {url}: {e}", registry=self.registry, url=url, e=e)
                raise UpstreamError(self.registry, f"redirect refused: {e}", 502) from None
            response = _TimedResponse(response, self, url.split("?")[0])
            if self.on_response:
                self.on_response(self.registry, method, response.code, response)
            self.budget.observe(self.allowance, response.code, response.headers)
            location = header(response, "Location")
            if response.code not in REDIRECT_STATUSES or not location:
                return response
            await discard(response)
            url = urljoin(url, location)
            target = urlsplit(url)
            if target.scheme not in ("http", "https"):
                raise UpstreamError(self.registry, f"redirect to a non-HTTP URL refused: {url[:100]!r}", 502)
            if target.netloc != origin.netloc or (origin.scheme, target.scheme) == ("https", "http"):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise UpstreamError(self.registry, "too many redirects", 502)

    def _trusted(self, host: str | None) -> bool:
        """The upstream's own host and the ones the operator listed: reached at whatever address they have."""
        host = (host or "").lower()
        return host == (urlsplit(self.upstream.url).hostname or "").lower() or host in self.upstream.redirect_hosts


def make_pool(reactor: Any) -> webclient.HTTPConnectionPool:
    """Persistent upstream connections, shared by every registry client."""
    pool = webclient.HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 120
    return pool


def make_http_client(reactor: Any, config: Config, pool: webclient.HTTPConnectionPool) -> HTTPClient:
    """treq over an Agent that verifies TLS against the system trust store (the Agent's default policy)."""
    return HTTPClient(webclient.Agent(reactor, connectTimeout=config.connect_timeout, pool=pool))
