"""A fake Docker Hub for dioproxy's fast tests: registry, token service and CDN on three loopback ports.

Why a fake rather than the CNCF registry: the proxy's tests must *break* the upstream on purpose (cut a body
mid-way, flip a byte, stall, rate-limit, refuse tokens) and count exactly what reached it, all within
milliseconds. Why three ports: Docker Hub's registry, auth service and blob CDN are different hosts, and the
proxy must behave accordingly (never forward the registry's ``Authorization`` header to the CDN, follow the
``WWW-Authenticate`` realm instead of hard-coding it).

Usage::

    fake = start_fake_registry()                 # listens on 127.0.0.1, three random ports
    self.addCleanup(fake.stop)
    image = fake.add_image("library/alpine", "3.19", layer_sizes=[1024, 2 * 2**20])
    fake.cut_blob(image.layer_digests[1], after_bytes=100_000)
    ...                                          # point the proxy at fake.registry_url, pull
    self.assertEqual(fake.count(role="cdn", method="GET", path_contains=image.layer_digests[1]), 2)

Every attribute that changes behaviour (``latency``, ``no_range``, ``token_fail``, ``redirect_to``, ...)
may be set at any time; ``reset_faults()`` clears them all.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import struct
import termios
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.python import log
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

SERVICE = "fake.registry"
ROLES = ("registry", "auth", "cdn")
CHUNK = 64 * 1024
RATELIMIT_WINDOW = 21600

_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    429: "TOOMANYREQUESTS",
    503: "UNAVAILABLE",
}


def sha256_digest(data: bytes) -> str:
    """The registry digest of ``data``: what a client must verify."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> bytes:
    # Indented like Docker Hub's manifests, so a proxy that re-serialises JSON breaks the digest visibly.
    return json.dumps(obj, indent=3).encode()


# --- content model --------------------------------------------------------------------------------


@dataclass
class PlatformManifest:
    """One image manifest (schema2 or OCI) with its config and layers."""

    platform: str
    digest: str
    body: bytes
    media_type: str
    config_digest: str
    config: bytes
    layer_digests: list[str]
    layers: list[bytes]


@dataclass
class Image:
    """What ``add_image`` built: the tag's target (an index for multi-platform images) and its manifests."""

    repo: str
    tag: str | None
    digest: str
    body: bytes
    media_type: str
    manifests: list[PlatformManifest]
    is_index: bool = False

    @property
    def index_digest(self) -> str | None:
        return self.digest if self.is_index else None

    @property
    def manifest_digest(self) -> str:
        """The first (for single-platform images: the only) platform manifest."""
        return self.manifests[0].digest

    def platform(self, name: str) -> PlatformManifest:
        return next(m for m in self.manifests if m.platform == name)

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob of the image (configs and layers) by digest."""
        out: dict[str, bytes] = {}
        for m in self.manifests:
            out[m.config_digest] = m.config
            out.update(zip(m.layer_digests, m.layers))
        return out

    @property
    def layer_digests(self) -> list[str]:
        return list(dict.fromkeys(d for m in self.manifests for d in m.layer_digests))

    @property
    def layers(self) -> list[bytes]:
        blobs = self.blobs
        return [blobs[d] for d in self.layer_digests]


@dataclass
class _Manifest:
    body: bytes
    media_type: str


@dataclass
class _Repository:
    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, _Manifest] = field(default_factory=dict)


@dataclass
class RequestRecord:
    """One request as the fake saw it; ``status`` stays None while nothing was answered (gated, stalled)."""

    role: str
    method: str
    path: str
    query: dict[str, str]  # repeated parameters are joined with a space, like OAuth scopes
    headers: dict[str, str]  # lower-case names
    status: int | None = None
    finished: bool = False  # the response completed normally (not cut, stalled or aborted)


@dataclass
class _Token:
    repositories: set[str]
    service: str | None
    expires_at: float
    user: str | None = None


@dataclass
class _FailRule:
    remaining: int
    status: int
    role: str | None
    path_contains: str | None
    method: str | None
    retry_after: int | None


@dataclass
class _StallRule:
    path_contains: str
    after_bytes: int
    role: str | None


@dataclass
class _BlobFault:
    kind: str  # corrupt | cut | short | stall | extra
    amount: int
    remaining: int | None  # None: every request until reset_faults()


@dataclass
class _BodyPlan:
    """What one blob response will do wrong, decided when the request arrives."""

    corrupt_at: int | None = None
    stop_after: int | None = None
    stop_action: str = ""  # abort | close | stall
    extra: int = 0


class _Unsatisfiable(Exception):
    pass


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for one ``bytes=`` range; None means serve the whole blob (as RFC 9110
    allows for multiple or malformed ranges). Raises _Unsatisfiable for a range beyond the end."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = int(last) + 1 if last.isdigit() else size
    if start >= size:
        raise _Unsatisfiable
    if end <= start:
        return None
    return start, min(end, size)


# --- the fake -------------------------------------------------------------------------------------


class FakeRegistry:
    """Content, auth state, fault switches and request log of the fake Docker Hub.

    ``auth_mode``: "bearer" (Docker Hub's token flow, the default), "basic" (the registry itself wants
    ``Authorization: Basic``) or None (open). ``users`` are the accepted Basic credentials; repositories in
    ``private`` are only granted to tokens requested with valid credentials. Blobs are global (any repository
    name serves any stored blob).
    """

    def __init__(
        self,
        reactor: Any = None,
        *,
        auth_mode: str | None = "bearer",
        require_auth: bool = True,
        users: dict[str, str] | None = None,
        private: Sequence[str] = (),
        blob_redirect: bool = True,
        ratelimit: int = 100,
        account_ratelimit: int = 200,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.auth_mode = auth_mode if require_auth else None
        self.users = dict(users or {})
        self.private = set(private)
        self.blob_redirect = blob_redirect
        self.ratelimit_limit = ratelimit
        self.ratelimit_remaining = ratelimit
        self.ratelimit_retry_after: int | None = 60  # None: a 429 without Retry-After (as Docker Hub's pull limit)
        #: Signed-in users are counted per account (anonymous pulls per address: ``ratelimit_remaining``).
        self.account_ratelimit_limit = account_ratelimit
        self.account_ratelimit_remaining: dict[str, int] = {}
        self.token_ttl = 300
        self.cdn_url_ttl = 600
        self.cdn_reject_authorization = True  # like S3/CloudFront: a signed URL plus Authorization is a 400
        self.ignore_paging = False  # True: tags/list ignores n and last (the CNCF registry 2.8 does)
        self.referrers_api = False  # False: 404 on /referrers/ (distribution 2.x); clients use the fallback tag
        self.referrers_page: int | None = None  # answer at most this many referrers, with a Link to the rest
        self.strict_repos = False  # True: a blob is served only through a repository whose manifests name it
        self.requests: list[RequestRecord] = []
        self.registry_url = self.auth_url = self.cdn_url = ""

        self._blobs: dict[str, bytes] = {}
        self._repos: dict[str, _Repository] = {}
        self._tokens: dict[str, _Token] = {}
        self._cdn_signatures: dict[str, tuple[str, float]] = {}
        self._ports: dict[str, Any] = {}
        self._connections: dict[Any, tuple[Any, defer.Deferred]] = {}
        self._calls: set[IDelayedCall] = set()
        self._stopped: defer.Deferred | None = None
        self._gates: dict[str, list[Callable[[], None]]] = {}
        self.reset_faults()

    # --- lifecycle ---

    def start(self) -> FakeRegistry:
        """Listen on three random loopback ports; the URLs are known as soon as this returns."""
        for role in ROLES:
            site = _TrackingSite(_RoleResource(self, role), self, reactor=self.reactor)
            port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
            self._ports[role] = port
            setattr(self, f"{role}_url", f"http://127.0.0.1:{port.getHost().port}")
        return self

    def stop(self) -> defer.Deferred:
        """Stop listening, abort every open connection (stalled and gated ones too) and cancel timers, so
        trial's dirty-reactor check passes. Safe to call twice."""
        if self._stopped is None:
            for call in self._calls:
                if call.active():
                    call.cancel()
            self._calls.clear()
            waits = [defer.maybeDeferred(port.stopListening) for port in self._ports.values()]
            for transport, closed in list(self._connections.values()):
                waits.append(closed)
                transport.abortConnection()
            self._stopped = defer.gatherResults(waits, consumeErrors=True).addErrback(log.err)
        # A fresh Deferred per caller: the test and an addCleanup may both wait for the same stop.
        d: defer.Deferred = defer.Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self._stopped.addCallback(fire)
        return d

    def _track(self, proto: Any) -> None:
        # The protocol is Twisted's own (a wrapper that picks HTTP/1.1 or h2), so wrap this instance's
        # connection events rather than subclassing.
        closed: defer.Deferred = defer.Deferred()
        made, lost = proto.makeConnection, proto.connectionLost

        def makeConnection(transport: Any) -> None:
            self._connections[proto] = (transport, closed)
            made(transport)

        def connectionLost(reason: Any) -> None:
            try:
                lost(reason)
            finally:
                self._connections.pop(proto, None)
                closed.callback(None)

        proto.makeConnection, proto.connectionLost = makeConnection, connectionLost

    def _later(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall | None:
        """``callLater`` that stop() can cancel; nothing is scheduled once stopped."""
        if self._stopped is not None:
            return None
        if len(self._calls) > 64:
            self._calls = {c for c in self._calls if c.active()}
        call = self.reactor.callLater(delay, f, *args)
        self._calls.add(call)
        return call

    # --- content ---

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self._blobs[digest] = data
        return digest

    def remove_blob(self, digest: str) -> None:
        self._blobs.pop(digest, None)

    def add_manifest(self, repo: str, tag: str | None, body: bytes, media_type: str) -> str:
        """Store manifest bytes exactly as given (the digest covers them) and point ``tag`` at them."""
        digest = sha256_digest(body)
        repository = self._repos.setdefault(repo, _Repository())
        repository.manifests[digest] = _Manifest(body, media_type)
        if tag is not None:
            repository.tags[tag] = digest
        return digest

    def lie_about(self, repo: str, digest: str, body: bytes) -> None:
        """Serve ``body`` as the manifest ``digest`` of ``repo`` (bytes that do not match: a lying upstream)."""
        manifest = self._repos[repo].manifests[digest]
        self._repos[repo].manifests[digest] = _Manifest(body, manifest.media_type)

    def add_referrer(self, repo: str, subject: Image, artifact_type: str, annotations: dict | None = None) -> str:
        """Push an artifact (a signature, an SBOM) whose ``subject`` is ``subject``, as oras or cosign do: the
        manifest, and the subject's referrers tag ``sha256-<hex>`` (an index) updated to list it, which is what
        clients read from a registry without the referrers API. Returns the artifact's digest."""
        body = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": self.add_blob(b"{}"), "size": 2},
                "layers": [],
                "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": len(subject.body)},
                **({"annotations": annotations} if annotations else {}),
            }
        )
        digest = self.add_manifest(repo, None, body, OCI_MANIFEST)
        tag = subject.digest.replace(":", "-")
        repository = self._repos[repo]
        index = repository.manifests.get(repository.tags.get(tag, ""))
        entries = json.loads(index.body)["manifests"] if index else []
        entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": artifact_type}
        if annotations:
            entry["annotations"] = annotations
        self.add_manifest(
            repo, tag, _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*entries, entry]}), OCI_INDEX
        )
        return digest

    def untag(self, repo: str, tag: str) -> None:
        self._repos[repo].tags.pop(tag, None)

    def add_image(
        self,
        repo: str,
        tag: str | None = "latest",
        layers: Sequence[bytes] | None = None,
        layer_sizes: Sequence[int] | None = None,
        platforms: Sequence[str] | None = None,
        fmt: str | None = None,
    ) -> Image:
        """Build and store a real image: config, layers, manifest(s), and for ``platforms`` an index.

        ``fmt`` is "docker" (schema2 / manifest list) or "oci"; the default is schema2 for a single-platform
        image and OCI for a multi-platform one. Explicit ``layers`` are shared by all platforms; with
        ``layer_sizes`` every platform gets its own random layers. Re-adding a tag moves it.
        """
        fmt = fmt or ("oci" if platforms else "docker")
        if fmt == "oci":
            manifest_type, config_type, layer_type, index_type = (
                OCI_MANIFEST,
                OCI_CONFIG,
                OCI_LAYER,
                OCI_INDEX,
            )
        else:
            manifest_type, config_type, layer_type = DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER
            index_type = DOCKER_MANIFEST_LIST

        def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}

        manifests = []
        for plat in platforms or ["linux/amd64"]:
            blobs = list(layers) if layers is not None else [os.urandom(n) for n in (layer_sizes or [1024])]
            os_name, arch, *variant = plat.split("/")
            config_obj: dict[str, Any] = {
                "architecture": arch,
                "os": os_name,
                "created": "2024-01-01T00:00:00Z",
                "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b) for b in blobs]},
                "history": [{"created_by": f"fake layer {i}"} for i in range(len(blobs))],
            }
            if variant:
                config_obj["variant"] = variant[0]
            config = _json(config_obj)
            for blob in [config, *blobs]:
                self.add_blob(blob)
            body = _json(
                {
                    "schemaVersion": 2,
                    "mediaType": manifest_type,
                    "config": descriptor(config_type, config),
                    "layers": [descriptor(layer_type, b) for b in blobs],
                }
            )
            digest = self.add_manifest(repo, None if platforms else tag, body, manifest_type)
            layer_digests = [sha256_digest(b) for b in blobs]
            manifests.append(
                PlatformManifest(plat, digest, body, manifest_type, sha256_digest(config), config, layer_digests, blobs)
            )
        if not platforms:
            m = manifests[0]
            return Image(repo, tag, m.digest, m.body, m.media_type, manifests)

        entries = []
        for m in manifests:
            os_name, arch, *variant = m.platform.split("/")
            platform = {"architecture": arch, "os": os_name, **({"variant": variant[0]} if variant else {})}
            entries.append({**descriptor(m.media_type, m.body), "platform": platform})
        body = _json({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
        digest = self.add_manifest(repo, tag, body, index_type)
        return Image(repo, tag, digest, body, index_type, manifests, is_index=True)

    def cdn_blob_url(self, digest: str) -> str:
        """A freshly signed CDN URL for ``digest``, as a 307 would carry (valid ``cdn_url_ttl`` seconds)."""
        signature = secrets.token_urlsafe(16)
        self._cdn_signatures[signature] = (digest, self.reactor.seconds() + self.cdn_url_ttl)
        return f"{self.cdn_url}/cdn/{signature}/{digest}"

    def expire_tokens(self) -> None:
        """Make every issued token (and signed CDN URL) invalid now, to test re-authentication."""
        self._tokens.clear()
        self._cdn_signatures.clear()

    # --- request log ---

    def count(self, role: str | None = None, method: str | None = None, path_contains: str | None = None) -> int:
        return len(self.find(role, method, path_contains))

    def find(
        self, role: str | None = None, method: str | None = None, path_contains: str | None = None
    ) -> list[RequestRecord]:
        return [
            r
            for r in self.requests
            if (role is None or r.role == role)
            and (method is None or r.method == method)
            and (path_contains is None or path_contains in r.path)
        ]

    def clear_requests(self) -> None:
        self.requests.clear()

    def wait_for_requests(
        self,
        n: int = 1,
        role: str | None = None,
        method: str | None = None,
        path_contains: str | None = None,
        timeout: float = 5.0,
    ) -> defer.Deferred:
        """Fires once at least ``n`` matching requests arrived (polling; no sleeping on the reactor)."""
        d: defer.Deferred = defer.Deferred()
        deadline = self.reactor.seconds() + timeout

        def poll() -> None:
            if self.count(role, method, path_contains) >= n:
                d.callback(None)
            elif self._stopped is not None:
                d.errback(RuntimeError("the fake registry was stopped"))
            elif self.reactor.seconds() > deadline:
                d.errback(TimeoutError(f"{self.count(role, method, path_contains)} of {n} requests arrived"))
            else:
                self._later(0.005, poll)

        poll()
        return d

    # --- fault switches ---

    def reset_faults(self) -> None:
        """Clear every fault switch; requests held by a gate are released."""
        self.latency = 0.0
        self.no_range = False
        self.chunked = False  # blob bodies without Content-Length (chunked), as some registries and CDNs send
        self.slow_rate: int | None = None
        self.token_fail: int | None = None
        self.redirect_to: str | None = None
        self._redirects: list[tuple[str, str, int]] = []
        self._fail_rules: list[_FailRule] = []
        self._stall_rules: list[_StallRule] = []
        self._blob_faults: dict[str, list[_BlobFault]] = {}
        gates, self._gates = self._gates, {}
        for waiters in gates.values():
            for release in waiters:
                release()

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        role: str | None = "registry",
        path_contains: str | None = None,
        retry_after: int | None = None,
        method: str | None = None,
    ) -> None:
        """The next ``n`` matching requests (role None: any role) answer ``status`` with a JSON error.
        A 429 carries ``Retry-After`` (``retry_after`` or 1)."""
        self._fail_rules.append(_FailRule(n, status, role, path_contains, method, retry_after))

    def redirect_path(self, path_contains: str, location: str, status: int = 302) -> None:
        """Registry requests whose path contains ``path_contains`` answer ``status`` with ``Location: location``
        (a compromised or hostile upstream pointing the proxy somewhere else)."""
        self._redirects.append((path_contains, location, status))

    def _add_blob_fault(self, digest: str, kind: str, amount: int, times: int | None) -> None:
        self._blob_faults.setdefault(digest, []).append(_BlobFault(kind, amount, times))

    def corrupt_blob(self, digest: str, offset: int = -1, times: int | None = None) -> None:
        """Serve the blob with one byte flipped (default: the last one), same length."""
        self._add_blob_fault(digest, "corrupt", offset, times)

    def cut_blob(self, digest: str, after_bytes: int, times: int | None = 1) -> None:
        """Declare the full Content-Length, then abort (RST) after ``after_bytes`` body bytes."""
        self._add_blob_fault(digest, "cut", after_bytes, times)

    def short_bytes(self, digest: str, missing: int = 1, times: int | None = None) -> None:
        """Declare the full Content-Length, send ``missing`` bytes fewer, then close cleanly (FIN)."""
        self._add_blob_fault(digest, "short", missing, times)

    def extra_bytes(self, digest: str, extra: int = 16, times: int | None = None) -> None:
        """Send ``extra`` bytes beyond Content-Length, then close."""
        self._add_blob_fault(digest, "extra", extra, times)

    def stall_blob(self, digest: str, after_bytes: int, times: int | None = None) -> None:
        """After ``after_bytes`` body bytes send nothing more, keeping the connection open (read timeouts)."""
        self._add_blob_fault(digest, "stall", after_bytes, times)

    def stall_body(self, path_contains: str, after_bytes: int, role: str | None = None) -> None:
        """Answers other than blob bodies (manifests, tags, referrers, tokens) whose path contains
        ``path_contains``: headers with the full Content-Length, ``after_bytes`` of the body, then nothing more,
        the connection left open (upstream read timeouts). Until reset_faults()."""
        self._stall_rules.append(_StallRule(path_contains, after_bytes, role))

    def slow(self, bytes_per_second: int | None) -> None:
        """Pace every blob body (CDN or direct) at about this rate; None switches it off."""
        self.slow_rate = bytes_per_second

    def gate_blob(self, digest: str) -> defer.Deferred:
        """Hold every response for this blob (no status line, no bytes) until the test fires the returned
        Deferred, e.g. to have 16 concurrent requests in flight before any byte flows."""
        waiters: list[Callable[[], None]] = []
        self._gates[digest] = waiters
        gate: defer.Deferred = defer.Deferred()

        def release(result: Any) -> Any:
            if self._gates.get(digest) is waiters:
                del self._gates[digest]
            for go in waiters:
                go()
            return result

        gate.addCallback(release)
        return gate

    def held(self, digest: str) -> int:
        """How many responses for ``digest`` a gate is holding right now."""
        return len(self._gates.get(digest, ()))

    # --- request handling ---

    def _arrive(self, role: str, request: Request) -> None:
        record = _record(role, request)
        request.dio_record = record  # type: ignore[attr-defined]
        self.requests.append(record)
        request.notifyFinish().addCallbacks(lambda _: setattr(record, "finished", True), lambda _: None)
        if role == "registry" and self.latency:
            self._later(self.latency, self._handle, role, request)
        else:
            self._handle(role, request)

    def _handle(self, role: str, request: Request) -> None:
        if _gone(request):
            return
        try:
            if self._injected_failure(role, request) or self._injected_redirect(role, request):
                return
            {"registry": self._registry, "auth": self._auth, "cdn": self._cdn}[role](request)
        except Exception:
            log.err(None, "fake registry failed")
            if not request.startedWriting and not _gone(request):
                self._error(request, 500, "UNKNOWN", "fake registry bug")

    def _injected_failure(self, role: str, request: Request) -> bool:
        record = request.dio_record  # type: ignore[attr-defined]
        for rule in self._fail_rules:
            if (
                rule.remaining > 0
                and rule.role in (None, role)
                and rule.method in (None, record.method)
                and (rule.path_contains is None or rule.path_contains in record.path)
            ):
                rule.remaining -= 1
                retry_after = rule.retry_after
                if retry_after is None and rule.status == 429:
                    retry_after = 1
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                code = _ERROR_CODES.get(rule.status, "UNKNOWN")
                self._error(request, rule.status, code, "injected failure", headers=headers)
                return True
        return False

    def _injected_redirect(self, role: str, request: Request) -> bool:
        path = request.dio_record.path  # type: ignore[attr-defined]
        for contains, location, status in self._redirects:
            if role == "registry" and contains in path:
                self._send(request, status, b"", {"Location": location}, content_type="text/html")
                return True
        return False

    def _begin(self, request: Request, status: int, headers: dict[str, str]) -> None:
        request.setResponseCode(status)
        if request.dio_record.role == "registry":  # type: ignore[attr-defined]
            request.setHeader("Docker-Distribution-API-Version", "registry/2.0")
        for name, value in headers.items():
            request.setHeader(name, value)
        request.dio_record.status = status  # type: ignore[attr-defined]

    def _send(
        self,
        request: Request,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        all_headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        self._begin(request, status, all_headers)
        record = request.dio_record  # type: ignore[attr-defined]
        for rule in self._stall_rules:
            if rule.path_contains in record.path and rule.role in (None, record.role) and request.method != b"HEAD":
                request.write(body[: rule.after_bytes])
                return
        request.write(body)
        request.finish()

    def _error(
        self,
        request: Request,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = _json({"errors": [{"code": code, "message": message, "detail": detail}]})
        self._send(request, status, body, headers)

    # --- auth ---

    def _basic_user(self, header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return None
        return user if user in self.users and self.users[user] == password else None

    def _authorized(self, request: Request, name: str | None) -> bool:
        if self.auth_mode is None:
            return True
        header = request.getHeader("authorization") or ""
        if self.auth_mode == "basic":
            return self._basic_user(header) is not None
        scheme, _, value = header.partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None or token.expires_at <= self.reactor.seconds():
            return False
        if token.service not in (None, SERVICE):  # a token minted for another service is worthless here
            return False
        return name is None or name in token.repositories

    def _challenge(self, request: Request, name: str | None) -> None:
        if self.auth_mode == "basic":
            challenge = 'Basic realm="fake"'
        else:
            challenge = f'Bearer realm="{self.auth_url}/token",service="{SERVICE}"'
            if name is not None:
                challenge += f',scope="repository:{name}:pull"'
        detail = [{"Type": "repository", "Name": name, "Action": "pull"}] if name else None
        headers = {"WWW-Authenticate": challenge}
        self._error(request, 401, "UNAUTHORIZED", "authentication required", detail, headers)

    def _auth(self, request: Request) -> None:
        record: RequestRecord = request.dio_record  # type: ignore[attr-defined]
        if self.token_fail:
            code = _ERROR_CODES.get(self.token_fail, "UNKNOWN")
            self._error(request, self.token_fail, code, "token service failure")
            return
        if record.path != "/token":
            self._send(request, 404, b"404 page not found\n", content_type="text/plain")
            return
        if record.method != "GET":
            self._error(request, 405, "UNSUPPORTED", "use GET")
            return
        user = None
        header = request.getHeader("authorization")
        if header:
            user = self._basic_user(header)
            if user is None:
                self._send(request, 401, _json({"details": "incorrect username or password"}))
                return
        granted = set()
        for scope in record.query.get("scope", "").split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and "pull" in actions.split(",") and (name not in self.private or user):
                granted.add(name)
        token = secrets.token_urlsafe(24)
        now = self.reactor.seconds()
        self._tokens[token] = _Token(granted, record.query.get("service"), now + self.token_ttl, user)
        issued = datetime.fromtimestamp(now, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        body = {"token": token, "access_token": token, "expires_in": self.token_ttl, "issued_at": issued}
        self._send(request, 200, _json(body))

    # --- registry ---

    def _registry(self, request: Request) -> None:
        record: RequestRecord = request.dio_record  # type: ignore[attr-defined]
        path = record.path
        if path not in ("/v2", "/v2/") and not path.startswith("/v2/"):
            self._send(request, 404, b"404 page not found\n", content_type="text/plain")
            return
        rest = path[len("/v2/") :]
        if not rest:
            if not self._authorized(request, None):
                self._challenge(request, None)
            else:
                self._send(request, 200, b"{}")
            return
        route = _parse_route(rest)
        if route is None:
            self._send(request, 404, b"404 page not found\n", content_type="text/plain")
            return
        kind, name, ref = route
        if not _NAME_RE.match(name):
            self._error(request, 404, "NAME_INVALID", "invalid repository name", name)
            return
        if not self._authorized(request, name):
            self._challenge(request, name)
            return
        if record.method not in ("GET", "HEAD"):
            self._error(request, 405, "UNSUPPORTED", "this fake only pulls")
            return
        if kind == "manifests":
            self._manifest(request, name, ref)
        elif kind == "blobs":
            self._registry_blob(request, name, ref)
        elif kind == "tags":
            self._tags(request, name)
        else:
            self._referrers(request, name, ref)

    def _account(self, request: Request) -> str | None:
        """The signed-in user a request's token was issued to (None: anonymous, or Basic auth mode)."""
        scheme, _, value = (request.getHeader("authorization") or "").partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        return token.user if token is not None else None

    def ratelimit_left(self, user: str | None = None) -> int:
        """Manifest GETs left for ``user`` (None: anonymous)."""
        if user is None:
            return self.ratelimit_remaining
        return self.account_ratelimit_remaining.setdefault(user, self.account_ratelimit_limit)

    def _ratelimit_headers(self, user: str | None = None) -> dict[str, str]:
        limit = self.ratelimit_limit if user is None else self.account_ratelimit_limit
        return {
            "ratelimit-limit": f"{limit};w={RATELIMIT_WINDOW}",
            "ratelimit-remaining": f"{self.ratelimit_left(user)};w={RATELIMIT_WINDOW}",
        }

    def _manifest(self, request: Request, name: str, ref: str) -> None:
        # Docker Hub counts manifest GETs only, per address anonymously and per account signed in; HEADs are free
        # and show the current budget.
        user = self._account(request)
        if request.method == b"GET":
            if self.ratelimit_left(user) <= 0:
                headers = self._ratelimit_headers(user)
                if self.ratelimit_retry_after is not None:
                    headers["Retry-After"] = str(self.ratelimit_retry_after)
                message = "You have reached your pull rate limit."
                self._error(request, 429, "TOOMANYREQUESTS", message, None, headers)
                return
            if user is None:
                self.ratelimit_remaining -= 1
            else:
                self.account_ratelimit_remaining[user] -= 1
        headers = self._ratelimit_headers(user)
        repo = self._repos.get(name)
        digest = ref if ref.startswith("sha256:") else (repo.tags.get(ref) if repo else None)
        manifest = repo.manifests.get(digest) if repo and digest else None
        if manifest is None:
            self._error(request, 404, "MANIFEST_UNKNOWN", "manifest unknown", {"Tag": ref}, headers)
            return
        if not _accepts(request.getHeader("accept"), manifest.media_type):
            # What distribution does for an OCI manifest when the client does not list OCI types.
            detail = f"{manifest.media_type} found, but the Accept header does not allow it"
            self._error(request, 404, "MANIFEST_UNKNOWN", "manifest unknown", detail, headers)
            return
        headers.update({"Docker-Content-Digest": digest, "ETag": f'"{digest}"'})
        if request.getHeader("if-none-match") in (f'"{digest}"', digest):
            self._begin(request, 304, headers)
            request.finish()
            return
        self._send(request, 200, manifest.body, headers, content_type=manifest.media_type)

    def _in_repo(self, name: str, digest: str) -> bool:
        """Whether one of the repository's manifests references the blob (``strict_repos``, like real registries)."""
        repository = self._repos.get(name)
        return repository is not None and any(digest.encode() in m.body for m in repository.manifests.values())

    def _registry_blob(self, request: Request, name: str, digest: str) -> None:
        if not _DIGEST_RE.match(digest):
            self._error(request, 400, "DIGEST_INVALID", "invalid digest", digest)
        elif digest not in self._blobs or (self.strict_repos and not self._in_repo(name, digest)):
            self._error(request, 404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
        elif self.redirect_to or self.blob_redirect:
            location = self.redirect_to or self.cdn_blob_url(digest)
            self._send(request, 307, b"", {"Location": location}, content_type="text/html")
        else:
            self._serve_blob(request, digest, {"Docker-Content-Digest": digest})

    def _tags(self, request: Request, name: str) -> None:
        repo = self._repos.get(name)
        if repo is None:
            self._error(request, 404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})
            return
        query = {} if self.ignore_paging else request.dio_record.query  # type: ignore[attr-defined]
        tags = sorted(repo.tags)
        if "last" in query:
            tags = [t for t in tags if t > query["last"]]
        headers = {}
        if query.get("n", "").isdigit():
            n = int(query["n"])
            if len(tags) > n:
                tags = tags[:n]
                if tags:
                    next_query = urlencode({"n": n, "last": tags[-1]})
                    headers["Link"] = f'</v2/{name}/tags/list?{next_query}>; rel="next"'
        self._send(request, 200, _json({"name": name, "tags": tags}), headers)

    def _referrers(self, request: Request, name: str, digest: str) -> None:
        if not self.referrers_api:
            # distribution 2.x has no such route: plain-text 404, as a proxy will meet it in the wild.
            self._send(request, 404, b"404 page not found\n", content_type="text/plain")
            return
        artifact_type = request.dio_record.query.get("artifactType")  # type: ignore[attr-defined]
        repo = self._repos.get(name) or _Repository()
        entries = []
        for mdigest, manifest in repo.manifests.items():
            try:
                doc = json.loads(manifest.body)
            except ValueError:
                continue
            if not isinstance(doc, dict) or (doc.get("subject") or {}).get("digest") != digest:
                continue
            kind = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
            if artifact_type and kind != artifact_type:
                continue
            entry = {"mediaType": manifest.media_type, "digest": mdigest, "size": len(manifest.body)}
            if kind:
                entry["artifactType"] = kind
            if doc.get("annotations"):
                entry["annotations"] = doc["annotations"]
            entries.append(entry)
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        entries.sort(key=lambda e: e["digest"])
        last = request.dio_record.query.get("last")  # type: ignore[attr-defined]
        if last:
            entries = [e for e in entries if e["digest"] > last]
        if self.referrers_page is not None and len(entries) > self.referrers_page:
            entries = entries[: self.referrers_page]
            query = urlencode(
                {**({"artifactType": artifact_type} if artifact_type else {}), "last": entries[-1]["digest"]}
            )
            headers["Link"] = f'</v2/{name}/referrers/{digest}?{query}>; rel="next"'
        body = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        self._send(request, 200, body, headers, content_type=OCI_INDEX)

    # --- CDN and blob bodies ---

    def _cdn(self, request: Request) -> None:
        parts = request.dio_record.path.split("/")  # type: ignore[attr-defined]
        if len(parts) != 4 or parts[1] != "cdn":
            self._send(request, 404, b"Not Found\n", content_type="text/plain")
            return
        signature, digest = parts[2], parts[3]
        signed = self._cdn_signatures.get(signature)
        if signed is None or signed[0] != digest or signed[1] <= self.reactor.seconds():
            self._send(request, 403, b"<Error><Code>AccessDenied</Code></Error>", content_type="text/xml")
        elif self.cdn_reject_authorization and request.getHeader("authorization"):
            body = b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message>"
            self._send(request, 400, body + b"</Error>", content_type="text/xml")
        elif digest not in self._blobs:
            self._send(request, 404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="text/xml")
        elif request.method not in (b"GET", b"HEAD"):
            self._send(request, 405, b"", content_type="text/plain")
        else:
            self._serve_blob(request, digest, {})

    def _take_plan(self, digest: str, size: int) -> _BodyPlan:
        """Consume this response's share of the blob's faults."""
        plan = _BodyPlan()
        faults = self._blob_faults.get(digest, [])
        for fault in faults:
            if fault.remaining is not None:
                fault.remaining -= 1
            if fault.kind == "corrupt":
                plan.corrupt_at = fault.amount
            elif fault.kind == "extra":
                plan.extra = fault.amount
            else:
                action = {"cut": "abort", "short": "close", "stall": "stall"}[fault.kind]
                stop = max(0, size - fault.amount) if fault.kind == "short" else fault.amount
                if plan.stop_after is None or stop < plan.stop_after:
                    plan.stop_after, plan.stop_action = stop, action
        self._blob_faults[digest] = [f for f in faults if f.remaining is None or f.remaining > 0]
        return plan

    def _serve_blob(self, request: Request, digest: str, headers: dict[str, str]) -> None:
        data = self._blobs[digest]
        size = len(data)
        start, end, status = 0, size, 200
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{digest}"', **headers}
        range_header = request.getHeader("range")
        if not self.no_range:
            headers["Accept-Ranges"] = "bytes"
            if range_header:
                try:
                    byte_range = _parse_range(range_header, size)
                except _Unsatisfiable:
                    headers["Content-Range"] = f"bytes */{size}"
                    self._send(request, 416, b"", headers, content_type=headers["Content-Type"])
                    return
                if byte_range is not None:
                    start, end, status = *byte_range, 206
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if not self.chunked:
            headers["Content-Length"] = str(end - start)
        head = request.method == b"HEAD"
        plan = _BodyPlan() if head else self._take_plan(digest, end - start)
        if plan.corrupt_at is not None and size:
            flipped = bytearray(data)
            flipped[plan.corrupt_at] ^= 0xFF
            data = bytes(flipped)

        def go() -> None:
            if _gone(request):
                return
            self._begin(request, status, headers)
            if head:
                request.finish()
            else:
                _BlobSender(self, request, data, start, end, plan).begin()

        waiters = self._gates.get(digest)
        if waiters is not None:
            waiters.append(go)
        else:
            go()


@implementer(IPushProducer)
class _BlobSender:
    """Writes ``data[start:end]`` in 64 KiB chunks as a push producer, so back-pressure, pacing and injected
    cuts all happen mid-body, as on a real network."""

    def __init__(
        self, fake: FakeRegistry, request: Request, data: bytes, start: int, end: int, plan: _BodyPlan
    ) -> None:
        self._fake, self._request, self._data = fake, request, data
        self._start, self._pos, self._end, self._plan = start, start, end, plan
        self._paused = self._done = self._pumping = False
        self._call: IDelayedCall | None = None

    def begin(self) -> None:
        self._request.notifyFinish().addBoth(self._finished)
        self._request.registerProducer(self, True)
        self._request.write(b"")  # the status line goes out even if no body byte ever follows (stall at 0)
        self._pump()

    def _finished(self, _: Any) -> None:
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._call is None:
            self._pump()

    def stopProducing(self) -> None:
        self._finished(None)

    def _pump(self) -> None:
        self._call = None
        if self._pumping:
            return
        self._pumping = True
        try:
            self._write_some()
        finally:
            self._pumping = False

    def _write_some(self) -> None:
        plan, rate = self._plan, self._fake.slow_rate
        while not (self._paused or self._done):
            limit = self._end - self._pos
            if plan.stop_after is not None:
                limit = min(limit, plan.stop_after - (self._pos - self._start))
            if limit <= 0:
                self._stop_early() if self._pos < self._end else self._complete()
                return
            size = min(CHUNK, limit, max(1, rate // 20) if rate else CHUNK)
            self._request.write(self._data[self._pos : self._pos + size])
            self._pos += size
            if rate:
                self._call = self._fake._later(size / rate, self._pump)
                return

    def _stop_early(self) -> None:
        self._done = True
        action = self._plan.stop_action
        if action == "stall":
            return  # keep the connection open and silent; stop() or the client ends it
        self._request.unregisterProducer()
        if action == "abort":
            self._abort_when_flushed(self._request.channel.transport, self._fake.reactor.seconds() + 0.5)
        else:
            self._request.loseConnection()

    def _abort_when_flushed(self, transport: Any, deadline: float) -> None:
        """Reset the connection once the bytes before the cut reached the client: a reset discards whatever
        is still unsent, in Twisted's buffer or the kernel's, and the cut must be exactly ``after_bytes`` for
        resume tests to be deterministic. A client that does not read loses them after the deadline."""
        if _unsent(transport) and self._fake.reactor.seconds() < deadline and not transport.disconnected:
            self._fake._later(0.002, self._abort_when_flushed, transport, deadline)
        else:
            transport.abortConnection()

    def _complete(self) -> None:
        self._done = True
        if self._plan.extra:
            self._request.write(b"X" * self._plan.extra)
        transport = self._request.channel.transport
        self._request.unregisterProducer()
        self._request.finish()
        if self._plan.extra:
            transport.loseConnection()  # the stray bytes must not be read as the next response


# --- twisted.web glue -----------------------------------------------------------------------------


class _RoleResource(Resource):
    """One leaf resource per role: the fake parses paths itself, because repository names contain slashes."""

    isLeaf = True

    def __init__(self, fake: FakeRegistry, role: str) -> None:
        super().__init__()
        self._fake, self._role = fake, role

    def render(self, request: Request) -> Any:
        self._fake._arrive(self._role, request)
        return NOT_DONE_YET


class _TrackingSite(Site):
    """A Site that remembers its connections so stop() can abort them, and keeps no access log of its own."""

    def __init__(self, resource: Resource, fake: FakeRegistry, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self._fake = fake

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        self._fake._track(proto)
        return proto

    def log(self, request: Request) -> None:
        pass


def _unsent(transport: Any) -> int:
    """Bytes written but not yet acknowledged by the peer: Twisted's buffer (FileDescriptor internals; there
    is no public "drained" signal for an unpaused producer) plus the kernel send queue (Linux TIOCOUTQ)."""
    pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    pending += getattr(transport, "_tempDataLen", 0)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        pending += struct.unpack("i", fcntl.ioctl(transport.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return pending


def _gone(request: Request) -> bool:
    return bool(getattr(request, "_disconnected", False))


def _record(role: str, request: Request) -> RequestRecord:
    uri = request.uri.decode("utf-8", "replace")
    query = {k: " ".join(v) for k, v in parse_qs(urlsplit(uri).query, keep_blank_values=True).items()}
    headers = {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }
    return RequestRecord(role, request.method.decode("ascii", "replace"), urlsplit(uri).path, query, headers)


def _parse_route(rest: str) -> tuple[str, str, str] | None:
    """Split ``<name>/<kind>/<ref>`` from the right, since names contain slashes."""
    if rest.endswith("/tags/list"):
        return "tags", rest[: -len("/tags/list")], ""
    parts = rest.rsplit("/", 2)
    if len(parts) == 3 and parts[1] in ("manifests", "blobs", "referrers") and parts[0] and parts[2]:
        return parts[1], parts[0], parts[2]
    return None


def _accepts(accept: str | None, media_type: str) -> bool:
    """No Accept header (curl) gets anything; otherwise the stored type, or a wildcard, must be listed."""
    if not accept:
        return True
    listed = {part.split(";")[0].strip() for part in accept.split(",")}
    return bool(listed & {media_type, "*/*", "application/*"})


def start_fake_registry(reactor: Any = None, **options: Any) -> FakeRegistry:
    """Create and start a FakeRegistry (options as for FakeRegistry); listening before this returns."""
    return FakeRegistry(reactor, **options).start()


if __name__ == "__main__":  # pragma: no cover - manual poking with curl
    import sys

    from twisted.internet import reactor as _reactor

    log.startLogging(sys.stdout)
    fake = start_fake_registry(_reactor, auth_mode=None if "--open" in sys.argv else "bearer")
    image = fake.add_image("library/alpine", "latest", layer_sizes=[1024, 1 << 20], platforms=["linux/amd64"])
    print(f"registry {fake.registry_url}  auth {fake.auth_url}  cdn {fake.cdn_url}")
    print(f"library/alpine:latest -> {image.digest}")
    _reactor.run()
