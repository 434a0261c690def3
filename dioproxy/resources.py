"""The twisted.web tree: ``/v2/`` → repository name → manifests | blobs | tags | referrers; ``/token``; ``/healthz``.

Resources stay thin: parse the request, call the :class:`~dioproxy.mirror.Mirror`, write headers and bytes (a
blob's through the responder its :class:`~dioproxy.blobs.Blobs` service picked).
Every failure becomes a registry JSON error; nothing a client sends can produce a traceback.
"""

from __future__ import annotations

import errno
import json
import math
import re
import time
from typing import Any
from urllib.parse import urlencode

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from dioproxy import status, statuspage
from dioproxy.auth import SERVICE, scope_repositories
from dioproxy.blobs import BlobAsk
from dioproxy.errors import RegistryError, UpstreamError, unsupported
from dioproxy.fleet.fills import PEER_HEADER, verify
from dioproxy.headers import not_modified, request_header
from dioproxy.manifests import INDEX_TYPES
from dioproxy.metrics import MetricsPage
from dioproxy.mirror import Mirror
from dioproxy.names import check_digest, check_reference, is_digest
from dioproxy.routing import Target
from dioproxy.site import client_address
from dioproxy.upstream import discard, header, read_limited

log = Logger()

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
MAX_LISTING = 16 * 1024 * 1024
#: RFC 7234 5.5.1 (dropped by RFC 9111, still understood): what we answer from the cache while the upstream fails.
STALE_WARNING = '110 - "Response is Stale"'
#: For a passing shortage of ours (descriptors): the client may come back soon.
RETRY_SOON = {"Retry-After": "5"}


def arg(request: server.Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


#: What a proxy in front says about our URL; believed only from ``rate_limit.trusted_proxies`` (see ``Root``).
FORWARDED_URL_HEADERS = ("X-Forwarded-Proto", "X-Forwarded-Host")


def base_url(request: server.Request) -> str:
    """Our own URL as the client sees it, behind nginx too (``X-Forwarded-Proto`` / ``X-Forwarded-Host``)."""
    proto = (request_header(request, "X-Forwarded-Proto") or "").split(",")[0].strip()
    if proto not in ("http", "https"):
        proto = "https" if request.isSecure() else "http"
    host = (request_header(request, "X-Forwarded-Host") or request_header(request, "Host") or "").split(",")[0]
    host = host.strip() or f"{request.getHost().host}:{request.getHost().port}"
    return f"{proto}://{host}"


def write_error(request: server.Request, error: RegistryError) -> None:
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        request.channel.transport.abortConnection()
        return
    request.setResponseCode(error.status)
    for key, value in error.headers.items():
        request.setHeader(key, value)
    body = error.body()
    request.setHeader("Content-Type", "application/json")
    request.setHeader("Content-Length", str(len(body)))
    request.write(body)
    request.finish()


def render_error(request: server.Request, error: RegistryError) -> int:
    request.setHeader(*API_VERSION)
    write_error(request, error)
    return server.NOT_DONE_YET


class Endpoint(resource.Resource):
    """A leaf answering GET and HEAD asynchronously; the rest of the write methods get 405 UNSUPPORTED."""

    isLeaf = True

    def __init__(self, mirror: Mirror, name: str = "", argument: str = "") -> None:
        super().__init__()
        self.mirror = mirror
        self.name = name
        self.argument = argument

    #: Whether the mirror's users must be authenticated here (``/token`` is where they authenticate).
    guarded = True

    def render(self, request: server.Request) -> Any:
        request.setHeader(*API_VERSION)
        method = request.method.decode("ascii", "replace")
        if method not in ("GET", "HEAD"):
            return render_error(request, unsupported(method))
        d = defer.ensureDeferred(self._serve(request, method == "HEAD"))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def _serve(self, request: server.Request, head: bool) -> None:
        limiter = self.mirror.limiter
        if limiter is not None:
            wait = await limiter.retry_after(client_address(request, self.mirror.addresses))
            if wait:
                retry = {"Retry-After": str(max(1, math.ceil(wait)))}
                raise RegistryError(429, "TOOMANYREQUESTS", "too many requests from this client", headers=retry)
        gate = self.mirror.gate
        if gate is not None and self.guarded and not self.peer(request):
            ns = arg(request, "ns")  # the token must be for the registry this request is routed to
            realm = base_url(request) + "/token" + ("?" + urlencode({"ns": ns}) if ns else "")
            client = client_address(request, self.mirror.addresses)
            grant = await gate.grant(request_header(request, "Authorization"), realm, self.name or None, client)
            if self.name and grant.registry is not None and grant.registry != self.target(request).registry:
                raise gate.challenge(realm, self.name, "insufficient_scope")
        await self.handle(request, head)

    async def handle(self, request: server.Request, head: bool) -> None:
        raise NotImplementedError

    def peer(self, request: server.Request) -> bool:
        """Whether another replica of the fleet asks (its signature checked); a bad signature is 403."""
        signature = request_header(request, PEER_HEADER)
        fleet = self.mirror.fleet
        if signature is None or fleet is None:
            return False
        if not verify(fleet.secret, request.uri.decode("ascii", "replace"), signature, time.time()):
            raise RegistryError(403, "DENIED", "bad replica signature (coordination.secret differs?)")
        return True

    def target(self, request: server.Request) -> Target:
        target = self.mirror.route(self.name, arg(request, "ns"), request_header(request, "Host"))
        request.dioproxy_registry = target.registry
        request.dioproxy_repository = target.name  # for the status page's most pulled repositories
        request.setHeader("OCI-Namespace", target.registry)
        return target

    def _failed(self, failure: Failure, request: server.Request) -> None:
        error = failure.value
        if isinstance(error, UpstreamError):
            log.warn("{method} {uri}: {why}", method=request.method, uri=request.uri, why=error)
            error = error.to_registry_error()
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            # Passing: the descriptors come back as other transfers end. Say so, as accept() does (channel.py).
            log.warn("{method} {uri}: out of file descriptors ({e})", method=request.method, uri=request.uri, e=error)
            error = RegistryError(
                503, "UNAVAILABLE", "the mirror is out of file descriptors; try again shortly", headers=RETRY_SOON
            )
        if not isinstance(error, RegistryError):
            log.failure("unexpected error on {uri}", failure, uri=request.uri)
            error = RegistryError(500, "UNKNOWN", "internal error; see the proxy's log")
        write_error(request, error)

    def finish(self, request: server.Request, body: bytes, content_type: str, head: bool) -> None:
        if request._disconnected:
            return
        request.setHeader("Content-Type", content_type)
        request.setHeader("Content-Length", str(len(body)))
        if not head:
            request.write(body)
        request.finish()


class Base(Endpoint):
    """``/v2/``: the version check every Docker client starts with."""

    async def handle(self, request: server.Request, head: bool) -> None:
        self.finish(request, b"{}", "application/json", head)


class Manifests(Endpoint):
    async def handle(self, request: server.Request, head: bool) -> None:
        target = self.target(request)
        reference = check_reference(self.argument, target.name)
        manifest = await self.mirror.manifests.get(target, reference)
        if manifest.outcome == "stale":
            request.setHeader("Warning", STALE_WARNING)
        if (
            not is_digest(reference)
            and manifest.media_type in INDEX_TYPES
            and not _accepts(request, manifest.media_type)
        ):
            manifest = await self._platform_default(target, manifest)
        request.dioproxy_outcome = manifest.outcome
        etag = f'"{manifest.digest}"'
        request.setHeader("Docker-Content-Digest", manifest.digest)
        request.setHeader("ETag", etag)
        if not_modified(request) and not request._disconnected:
            request.setResponseCode(304)
            request.finish()
            return
        self.finish(request, manifest.body, manifest.media_type, head)

    async def _platform_default(self, target: Target, index: Any) -> Any:
        """An old client that takes no index gets the linux/amd64 image for a tag, as the CNCF registry does (a
        digest always names exactly its own bytes)."""
        for entry in json.loads(index.body).get("manifests", []):
            platform = entry.get("platform") or {}
            if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
                return await self.mirror.manifests.get(target, check_digest(entry.get("digest", "")))
        return index


def _accepts(request: server.Request, media_type: str) -> bool:
    accept = ",".join(request.requestHeaders.getRawHeaders("Accept", []))
    types = {part.split(";")[0].strip() for part in accept.split(",") if part.strip()}
    return not types or "*/*" in types or media_type in types or not any("manifest" in t for t in types)


class Blobs(Endpoint):
    async def handle(self, request: server.Request, head: bool) -> None:
        target = self.target(request)
        digest = check_digest(self.argument)
        request.setHeader("Docker-Content-Digest", digest)
        request.setHeader("ETag", f'"{digest}"')
        accel = self.mirror.config.accel_redirect  # nginx offers to send a cached file itself
        offered = not head and request_header(request, "X-Dioproxy-Accel") == "on" and not not_modified(request)
        ask = BlobAsk(target, digest, head, request_header(request, "Range"), accel if offered else None, request)
        ask.peer = self.peer(request)
        try:
            responder = await self.mirror.blobs.respond(ask)
        finally:
            if ask.outcome is not None:
                request.dioproxy_outcome = ask.outcome
        if request._disconnected:
            return responder.close()
        await responder.send(request, head)


class Tags(Endpoint):
    """``tags/list`` from the upstream, its ``Link`` to the next page pointed at us; paged by us when the upstream
    ignores ``n``/``last`` (the CNCF registry 2.8 does); from the tags the cache knows when the upstream is down."""

    async def handle(self, request: server.Request, head: bool) -> None:
        target = self.target(request)
        n, last = page_args(request)
        query = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
        path = f"/v2/{target.name}/tags/list" + ("?" + urlencode(query) if query else "")
        request.dioproxy_outcome = "pass"
        try:
            response = await self.mirror.client(target).request("GET", path, target.name)
            if response.code in (401, 403, 404):
                await discard(response)
                raise RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": self.name})
            if response.code != 200:
                await discard(response)
                raise UpstreamError(target.registry, f"HTTP {response.code} for tags of {target.name}", response.code)
            body = await read_limited(response, MAX_LISTING)
        except UpstreamError:
            if target.upstream.credentials is not None:  # tag names of a private repository: fail closed
                raise
            tags = await self.mirror.manifests.tags.names(target.registry, target.name)
            if not tags:
                raise
            request.dioproxy_outcome = "stale"
            request.setHeader("Warning", STALE_WARNING)
            self.page(request, tags, n, last, head)
            return
        link = header(response, "Link")
        if link:
            request.setHeader("Link", next_link(request, link, f"/v2/{self.name}/tags/list"))
        elif query:
            tags = _tags_of(body)
            if tags is not None:
                self.page(request, sorted(tags), n, last, head)
                return
        self.finish(request, body, "application/json", head)

    def page(self, request: server.Request, tags: list[str], n: int | None, last: str | None, head: bool) -> None:
        """One page of sorted ``tags`` as the spec says: after ``last``, at most ``n``, a ``Link`` if more follow."""
        if last is not None:
            tags = [t for t in tags if t > last]
        if n is not None and len(tags) > n:
            tags = tags[:n]
            if tags:
                cursor = urlencode({"n": n, "last": tags[-1]})
                request.setHeader("Link", next_link(request, f"<?{cursor}>", f"/v2/{self.name}/tags/list"))
        body = json.dumps({"name": self.name, "tags": tags}).encode()
        self.finish(request, body, "application/json", head)


def page_args(request: server.Request) -> tuple[int | None, str | None]:
    """``n`` and ``last`` of a listing; a malformed ``n`` is the client's mistake (400, not the upstream's)."""
    n = arg(request, "n")
    if n is not None and not (n.isdigit() and len(n) <= 9):
        raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested", {"n": n})
    return (int(n) if n is not None else None), arg(request, "last")


def _tags_of(body: bytes) -> list[str] | None:
    try:
        tags = json.loads(body).get("tags")
    except (ValueError, AttributeError):
        return None
    if tags is None:
        return []
    return tags if isinstance(tags, list) and all(isinstance(t, str) for t in tags) else None


def next_link(request: server.Request, link: str, path: str) -> str:
    """An upstream's ``Link: <...?query>; rel="next"`` pointed at ``path`` on us: its query (the upstream's own
    cursor) is kept as it is, with the client's ``ns`` added so the next page routes the same way."""
    match = re.search(r"<[^>]*\?([^>]*)>", link)
    query = match.group(1) if match else ""
    ns = arg(request, "ns")
    if ns:
        query += ("&" if query else "") + urlencode({"ns": ns})
    return f'<{base_url(request)}{path}?{query}>; rel="next"'


class Referrers(Endpoint):
    """The OCI referrers API, passed through; for an upstream without it (404), the referrers tag schema.

    A registry without the API answers 404 and clients push an index under the tag ``sha256-<hex>`` of the subject
    instead, so that tag is read (through the manifest store: cached, verified, served stale like any tag) and an
    empty index is the answer only when neither exists: signatures and SBOMs are never hidden.
    """

    async def handle(self, request: server.Request, head: bool) -> None:
        target = self.target(request)
        digest = check_digest(self.argument)
        request.dioproxy_outcome = "pass"
        # The whole query but our own ns: the upstream's Link cursor is its own business.
        query = [
            (key.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
            for key, values in request.args.items()
            if key != b"ns"
            for value in values
        ]
        path = f"/v2/{target.name}/referrers/{digest}" + ("?" + urlencode(query) if query else "")
        response = await self.mirror.client(target).request("GET", path, target.name)
        if response.code == 200:
            body = await read_limited(response, MAX_LISTING)
            link, filters = header(response, "Link"), header(response, "OCI-Filters-Applied")
            if link:
                request.setHeader("Link", next_link(request, link, f"/v2/{self.name}/referrers/{digest}"))
            if filters:
                request.setHeader("OCI-Filters-Applied", filters)
            self.finish(request, body, header(response, "Content-Type") or OCI_INDEX, head)
            return
        await discard(response)
        artifact_type = arg(request, "artifactType")
        body = await self._from_tag(request, target, digest, artifact_type)
        if artifact_type:
            request.setHeader("OCI-Filters-Applied", "artifactType")
        self.finish(request, body, OCI_INDEX, head)

    async def _from_tag(self, request: server.Request, target: Target, digest: str, artifact_type: str | None) -> bytes:
        """The referrers tag's index, keeping only ``artifact_type`` if asked; the empty index if there is none."""
        try:
            manifest = await self.mirror.manifests.get(target, digest.replace(":", "-", 1))
        except RegistryError as e:
            if e.code != "MANIFEST_UNKNOWN":
                raise
            return EMPTY_INDEX
        request.dioproxy_outcome = manifest.outcome
        try:
            index = json.loads(manifest.body)
            entries = index["manifests"]
        except (ValueError, TypeError, KeyError):
            entries = None
        if manifest.media_type != OCI_INDEX or not isinstance(entries, list):
            log.warn("{name}: the referrers tag of {digest} is not an index; ignored", name=target.name, digest=digest)
            return EMPTY_INDEX
        if not artifact_type:
            return manifest.body
        index["manifests"] = [e for e in entries if isinstance(e, dict) and e.get("artifactType") == artifact_type]
        return json.dumps(index).encode()


_ENDPOINTS = {"manifests": Manifests, "blobs": Blobs, "referrers": Referrers}


class V2(resource.Resource):
    """``/v2/``; below it the repository name may have any number of segments, so we split from the right."""

    def __init__(self, mirror: Mirror) -> None:
        super().__init__()
        self.mirror = mirror

    def render(self, request: server.Request) -> Any:
        return Base(self.mirror).render(request)

    def getChild(self, segment: bytes, request: server.Request) -> resource.Resource:
        parts = [segment, *request.postpath]
        request.postpath = []
        if parts == [b""]:
            return Base(self.mirror)
        try:
            text = [p.decode("ascii") for p in parts]
        except UnicodeDecodeError:
            return ErrorPage(RegistryError(400, "NAME_INVALID", "invalid repository name"))
        if len(text) >= 3 and text[-2] in _ENDPOINTS:
            return _ENDPOINTS[text[-2]](self.mirror, "/".join(text[:-2]), text[-1])
        if len(text) >= 3 and text[-2:] == ["tags", "list"]:
            return Tags(self.mirror, "/".join(text[:-2]))
        if request.method not in (b"GET", b"HEAD"):
            return ErrorPage(unsupported(request.method.decode("ascii", "replace")))
        return ErrorPage(RegistryError(404, "NOT_FOUND", "no such endpoint in the registry API"))


class ErrorPage(resource.Resource):
    isLeaf = True

    def __init__(self, error: RegistryError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: server.Request) -> Any:
        return render_error(request, self.error)


class Token(Endpoint):
    """``/token``: our own tokens when the mirror is closed (htpasswd), else the seed's forwarding endpoint.

    Forwarding asks the routed registry's realm anonymously, adding ``library/`` on docker.io: our upstream
    credentials never end up in a token handed to a client.
    """

    guarded = False

    async def handle(self, request: server.Request, head: bool) -> None:
        scopes = [v.decode("utf-8", "replace") for v in request.args.get(b"scope", [])]
        names = scope_repositories(scopes)
        request.dioproxy_outcome = "pass"
        gate = self.mirror.gate
        if gate is not None:
            client = client_address(request, self.mirror.addresses)
            user = await gate.login(request_header(request, "Authorization"), client)
            targets = {name: target for name in names if (target := self._route(request, name))}
            registry = next(iter(targets.values())).registry if targets else ""
            allowed = [name for name, target in targets.items() if target.registry == registry]
            answer = gate.tokens.issue(user, registry, allowed)
        else:
            answer = await self._forward(request, names[0] if names else None)
        self.finish(request, json.dumps(answer).encode(), "application/json", head)

    def _route(self, request: server.Request, name: str) -> Target | None:
        """Where a repository asked for in a token's scope is pulled from; None if it may not be."""
        try:
            return self.mirror.route(name, arg(request, "ns"), request_header(request, "Host"))
        except RegistryError:
            return None

    async def _forward(self, request: server.Request, name: str | None) -> dict:
        if name:
            target = self.mirror.route(name, arg(request, "ns"), request_header(request, "Host"))
            registry, scope = target.registry, f"repository:{target.name}:pull"
        else:
            registry, scope = arg(request, "ns") or self.mirror.config.default_registry, ""
            if registry not in self.mirror.clients:
                raise RegistryError(404, "NAME_UNKNOWN", f"registry {registry!r} is not mirrored here")
        request.dioproxy_registry = registry
        return await self.mirror.clients[registry].token(scope, anonymous=True)


class Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader("Content-Type", "application/json")
        return b'{"status":"ok"}'


class Status(Endpoint):
    """``/``: the status page for a browser, the same data as JSON for ``Accept: application/json``.

    Behind the same login as ``/v2/`` when the mirror is closed; the challenge is Basic, which a browser can answer.
    """

    async def _serve(self, request: server.Request, head: bool) -> None:
        try:
            await super()._serve(request, head)
        except RegistryError as e:
            if e.status == 401:
                e.headers["WWW-Authenticate"] = f'Basic realm="{SERVICE}"'
            raise

    async def handle(self, request: server.Request, head: bool) -> None:
        siblings = self.mirror.siblings
        if siblings is not None:  # --workers N: every worker's share that answers in time
            shares = await siblings.shares()
            data = status.page_data(self.mirror, base_url(request), shares, siblings.count)
        else:
            data = status.page_data(self.mirror, base_url(request))
        request.setHeader("Vary", "Accept")
        request.setHeader("Cache-Control", "no-store")
        if _wants_json(request):
            return self.finish(request, json.dumps(data).encode(), "application/json", head)
        request.setHeader("Content-Security-Policy", statuspage.CSP)
        request.setHeader("X-Content-Type-Options", "nosniff")
        self.finish(request, statuspage.render(data).encode(), "text/html; charset=utf-8", head)


def _wants_json(request: server.Request) -> bool:
    accept = request_header(request, "Accept") or ""
    return "application/json" in accept and "text/html" not in accept


class Scrape(Endpoint):
    """``/metrics``: as open as the mirror. A closed one shows it to its users (a Prometheus ``basic_auth``, or a
    token) and, without login, to the client addresses in ``auth.metrics_allow`` only."""

    def __init__(self, mirror: Mirror, page: resource.Resource) -> None:
        super().__init__(mirror)
        self.page = page

    async def _serve(self, request: server.Request, head: bool) -> None:
        if self.mirror.metrics_readers.trusts(client_address(request, self.mirror.addresses)):
            return await self.handle(request, head)
        await super()._serve(request, head)

    async def handle(self, request: server.Request, head: bool) -> None:
        if self.mirror.siblings is not None:  # --workers N: every worker's metrics, whichever answers
            request.dioproxy_outcome = "-"
            body = await self.mirror.siblings.exposition()
            return self.finish(request, body, CONTENT_TYPE_LATEST, head)
        body = self.page.render(request)
        self.finish(request, body, request.responseHeaders.getRawHeaders("Content-Type")[0], head)


class Root(resource.Resource):
    def __init__(self, mirror: Mirror) -> None:
        super().__init__()
        self.putChild(b"v2", V2(mirror))
        self.putChild(b"token", Token(mirror))
        self.putChild(b"healthz", Health())
        self.putChild(b"metrics", Scrape(mirror, MetricsPage(mirror.metrics)))
        self.mirror = mirror  # the site reports each finished request to it (metrics, cache last use)

    def getChildWithDefault(self, segment: bytes, request: server.Request) -> resource.Resource:
        """Every request passes here first: what a stranger says about our own URL is dropped before anything reads
        it (``base_url``: the token realm, ``Link`` headers)."""
        peer = getattr(request.getClientAddress(), "host", "")
        if not self.mirror.addresses.trusts(peer):
            for name in FORWARDED_URL_HEADERS:
                request.requestHeaders.removeHeader(name)
        return super().getChildWithDefault(segment, request)

    def getChild(self, segment: bytes, request: server.Request) -> resource.Resource:
        if segment == b"" and not request.postpath:
            return Status(self.mirror)
        return ErrorPage(RegistryError(404, "NOT_FOUND", "not found: this is a registry mirror, see /v2/"))
