"""Configuration: defaults, the YAML file, ``--upstream`` overrides, validated once at start.

A bad config is refused with a message naming the key, so a typo never becomes a silent default.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from dioproxy.fleet.redis import RedisAddress
from dioproxy.names import looks_like_host, parse_image

DEFAULT_UPSTREAMS = {
    "docker.io": "https://registry-1.docker.io",
    "ghcr.io": "https://ghcr.io",
    "quay.io": "https://quay.io",
    "gcr.io": "https://gcr.io",
    "registry.k8s.io": "https://registry.k8s.io",
    "mcr.microsoft.com": "https://mcr.microsoft.com",
    "nvcr.io": "https://nvcr.io",
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass(frozen=True)
class Upstream:
    """One mirrored registry: the name clients use and where it really is."""

    registry: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Hosts besides the upstream's own that its redirects may send us to at an internal address (lower case).
    redirect_hosts: tuple[str, ...] = ()

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)


@dataclass(frozen=True)
class AccessRule:
    """Repository name patterns (fnmatch, on the upstream's spelling: ``library/*``) for one registry."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Security:
    """Who may use the mirror. Everything is off by default: a mirror is usually open inside its network."""

    htpasswd: str | None = None
    token_ttl: float = 300.0
    token_secret: str | None = field(default=None, repr=False)
    access: dict[str, AccessRule] = field(default_factory=dict)
    rate: float = 0.0  # requests per second per client; 0 = unlimited
    burst: int = 0
    trusted_proxies: tuple[str, ...] = ()
    metrics_allow: tuple[str, ...] = ()  # client networks that read /metrics without login on a closed mirror
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class PrefetchImage:
    """An image kept warm (``prefetch:``): its tag revalidated every ``every`` seconds, new digests fetched."""

    registry: str
    name: str
    reference: str
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; empty: every platform
    every: float = 3600.0

    def __str__(self) -> str:
        sep = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.name}{sep}{self.reference}"


@dataclass(frozen=True)
class S3Storage:
    """``storage.s3``: one bucket (and key prefix) of an S3-compatible store, the tier behind the cache dir.

    No credentials (none in the file, its files or the environment) means boto3's own chain (an instance role).
    """

    bucket: str
    endpoint: str | None = None  # None: AWS itself, found from the region
    region: str = "us-east-1"
    prefix: str = ""  # "" or ends in "/"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    redirect: bool = False  # cached blob GETs answered 307 to a presigned URL of the store
    redirect_ttl: float = 300.0  # lifetime of those URLs
    max_size: int | None = None  # blob bytes the bucket may hold, for the whole fleet (needs coordination)
    max_age: float | None = None  # blobs unused this long leave the bucket (needs coordination)


@dataclass(frozen=True)
class Storage:
    """``storage:``: where verified content lives besides the cache dir (nothing: only the cache dir)."""

    s3: S3Storage | None = None


@dataclass(frozen=True)
class Coordination:
    """``coordination:``: the replicas of one mirror sharing fills through Redis (``docs/scaling.md``)."""

    redis: str  # redis://host[:port][/db]
    secret: str = field(repr=False)  # authenticates replicas to each other (the peer endpoint)
    advertise: str | None = None  # how other replicas reach this one; None: http://<hostname>:<port>


@dataclass(frozen=True)
class Config:
    upstreams: dict[str, Upstream]
    hosts: dict[str, str] = field(default_factory=dict)
    cache_dir: str = "./data"
    cache_enabled: bool = True
    tag_ttl: float = 300.0
    cache_max_size: int | None = None  # bytes; None: unbounded
    cache_max_age: float | None = None  # seconds since last use; None: no limit
    accel_redirect: str | None = None  # behind nginx: cached blobs are answered with X-Accel-Redirect to this prefix
    default_registry: str = "docker.io"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    offline_timeout: float = 30.0  # after an upstream failure, its registry is offline this long (dioproxy.health)
    negative_ttl: float = 30.0  # a tag the upstream answered 404 for is answered 404 from memory this long
    client_timeout: float = 60.0  # a client that reads nothing (or sends nothing while idle) this long is dropped
    max_connections: int | None = None  # client connections at once; None: sized to the fd limit (see site.py)
    security: Security = field(default_factory=Security)
    prefetch: tuple[PrefetchImage, ...] = ()
    pull_reserve: float = 20.0  # percent of an upstream's pull limit kept for images the cache lacks
    pull_wait: float = 5.0  # a request waits this long for a used-up pull budget to come back, else 429
    storage: Storage = field(default_factory=Storage)
    coordination: Coordination | None = None


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number or a string such as ``90s``, ``5m``, ``2h``, ``1d``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value) if abs(value) < 1e15 else math.inf
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(value))
        if not match:
            raise ConfigError(f"{key}: expected a duration like 300, 90s, 5m or 2h, got {value!r}")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not 0 <= seconds < 10**12:  # negative, NaN, or past any sensible lifetime
        raise ConfigError(f"{key}: expected a duration between 0 and 10^12 seconds, got {value!r}")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: Any, key: str) -> int:
    """Bytes from a number or a string such as ``500MB``, ``50GB``, ``1.5T`` (powers of 1000) or ``20GiB`` (1024)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgtKMGT])(i?)[bB]?|([bB]?))\s*", str(value))
        if not match:
            raise ConfigError(f"{key}: expected a size like 500MB, 50GB or 20GiB, got {value!r}")
        unit = (match.group(2) or "").lower()
        base = 1024 ** "kmgt".index(unit) * 1024 if unit and match.group(3) else _SIZE_UNITS[unit]
        size = float(match.group(1)) * base
    if size < 0:
        raise ConfigError(f"{key}: must not be negative")
    if size != size or size in (float("inf"), float("-inf")) or size > 2**63:
        raise ConfigError(f"{key}: {str(value)[:40]!r} is not a usable size")
    return int(size)


def _check_url(url: Any, key: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{key}: expected a URL string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _check_registry(name: Any, key: str) -> str:
    if not isinstance(name, str) or not looks_like_host(name):
        raise ConfigError(f"{key}: {name!r} is not a registry host name (like docker.io or ghcr.io)")
    return name


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


_TOP_KEYS = {
    "upstreams",
    "hosts",
    "cache",
    "default_registry",
    "timeouts",
    "limits",
    "auth",
    "access",
    "rate_limit",
    "tls",
    "prefetch",
    "pull_budget",
    "storage",
    "coordination",
}
_COORDINATION_KEYS = {"redis", "secret", "secret_file", "advertise"}
_CACHE_KEYS = {"dir", "tag_ttl", "enabled", "max_size", "max_age", "accel_redirect", "negative_ttl"}
_UPSTREAM_KEYS = {"url", "username", "password", "redirect_hosts"}
_TIMEOUT_KEYS = {"connect", "read", "offline", "client"}
_LIMIT_KEYS = {"max_connections"}
_AUTH_KEYS = {"htpasswd", "token_ttl", "secret", "metrics_allow"}
_RATE_KEYS = {"rate", "burst", "trusted_proxies"}
_TLS_KEYS = {"cert", "key"}
_BUDGET_KEYS = {"reserve", "wait"}
_PREFETCH_KEYS = {"image", "platforms", "every"}
_STORAGE_KEYS = {"s3"}
_S3_KEYS = {
    "endpoint",
    "bucket",
    "region",
    "prefix",
    "access_key",
    "secret_key",
    "access_key_file",
    "secret_key_file",
    "redirect",
    "redirect_ttl",
    "max_size",
    "max_age",
}
# S3's own rules for bucket names (3-63 of a-z 0-9 . -, starting and ending with a letter or digit).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_PRESIGN_MAX = 7 * 86400  # SigV4 presigned URLs live at most a week
_PLATFORM_RE = re.compile(r"[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_.]+)?")


def _unknown(given: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise ConfigError(f"{where}{extra[0]}: unknown key (known: {', '.join(sorted(allowed))})")


def build_config(
    data: dict | None = None,
    upstream_overrides: list[str] = (),
    cache_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults, a parsed YAML document and command-line overrides into a validated :class:`Config`.

    ``environ`` (default ``os.environ``) is where ``storage.s3`` credentials left out of the file are looked for.
    """
    data = _mapping(data, "(top level)")
    _unknown(data, _TOP_KEYS, "")

    upstreams = {name: Upstream(name, url) for name, url in DEFAULT_UPSTREAMS.items()}
    for name, spec in _mapping(data.get("upstreams"), "upstreams").items():
        key = f"upstreams.{name}"
        _check_registry(name, key)
        if isinstance(spec, str):
            spec = {"url": spec}
        spec = _mapping(spec, key)
        _unknown(spec, _UPSTREAM_KEYS, key + ".")
        if "url" not in spec:
            raise ConfigError(f"{key}.url: missing")
        username, password = spec.get("username"), spec.get("password")
        if (username is None) != (password is None):
            raise ConfigError(f"{key}: username and password go together")
        hosts = tuple(h.lower() for h in _strings(spec.get("redirect_hosts"), key + ".redirect_hosts"))
        upstreams[name] = Upstream(name, _check_url(spec["url"], key + ".url"), username, password, hosts)
    for override in upstream_overrides:
        name, sep, url = override.partition("=")
        if not sep:
            raise ConfigError(f"--upstream: expected REGISTRY=URL, got {override!r}")
        old = upstreams.get(name)
        key = f"--upstream {name}"
        upstreams[name] = Upstream(
            _check_registry(name, key),
            _check_url(url, key),
            old.username if old else None,
            old.password if old else None,
            old.redirect_hosts if old else (),
        )

    hosts = {}
    for host, registry in _mapping(data.get("hosts"), "hosts").items():
        if not isinstance(registry, str) or registry not in upstreams:
            raise ConfigError(f"hosts.{host}: {registry!r} is not among the upstreams")
        hosts[str(host).lower()] = registry

    cache = _mapping(data.get("cache"), "cache")
    _unknown(cache, _CACHE_KEYS, "cache.")
    enabled = cache.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"cache.enabled: expected true or false, got {enabled!r}")
    directory = cache_dir or cache.get("dir", "./data")
    if not isinstance(directory, str) or not directory:
        raise ConfigError(f"cache.dir: expected a path, got {directory!r}")

    accel = cache.get("accel_redirect")
    if accel is not None and not (isinstance(accel, str) and accel.startswith("/") and accel.endswith("/")):
        raise ConfigError(f"cache.accel_redirect: expected a location prefix like /_dioproxy/blobs/, got {accel!r}")

    default = data.get("default_registry", "docker.io")
    if not isinstance(default, str) or default not in upstreams:
        raise ConfigError(f"default_registry: {default!r} is not among the upstreams")

    max_size, max_age = cache.get("max_size"), cache.get("max_age")
    timeouts = _mapping(data.get("timeouts"), "timeouts")
    _unknown(timeouts, _TIMEOUT_KEYS, "timeouts.")
    client_timeout = parse_duration(timeouts.get("client", 60), "timeouts.client")
    if client_timeout <= 0:
        raise ConfigError("timeouts.client: must be more than 0")
    limits = _mapping(data.get("limits"), "limits")
    _unknown(limits, _LIMIT_KEYS, "limits.")
    max_connections = limits.get("max_connections")
    if max_connections is not None and (
        isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1
    ):
        raise ConfigError(f"limits.max_connections: expected a whole number >= 1, got {max_connections!r}")

    security = _security(data, upstreams)
    budget = _mapping(data.get("pull_budget"), "pull_budget")
    _unknown(budget, _BUDGET_KEYS, "pull_budget.")

    return Config(
        security=security,
        upstreams=upstreams,
        hosts=hosts,
        cache_dir=directory,
        cache_enabled=enabled,
        tag_ttl=parse_duration(cache.get("tag_ttl", 300), "cache.tag_ttl"),
        cache_max_size=parse_size(max_size, "cache.max_size") or None if max_size is not None else None,
        cache_max_age=parse_duration(max_age, "cache.max_age") or None if max_age is not None else None,
        accel_redirect=accel,
        default_registry=default,
        connect_timeout=parse_duration(timeouts.get("connect", 10), "timeouts.connect"),
        read_timeout=parse_duration(timeouts.get("read", 60), "timeouts.read"),
        offline_timeout=parse_duration(timeouts.get("offline", 30), "timeouts.offline"),
        negative_ttl=parse_duration(cache.get("negative_ttl", 30), "cache.negative_ttl"),
        prefetch=_prefetch(data.get("prefetch"), upstreams),
        client_timeout=client_timeout,
        max_connections=max_connections,
        pull_reserve=_percent(budget.get("reserve", 20), "pull_budget.reserve"),
        pull_wait=parse_duration(budget.get("wait", 5), "pull_budget.wait"),
        storage=_storage(data.get("storage"), os.environ if environ is None else environ),
        coordination=_coordination(data.get("coordination"), data.get("storage")),
    )


def _coordination(value: Any, storage: Any) -> Coordination | None:
    if value is None:
        s3 = (storage or {}).get("s3") or {} if isinstance(storage, dict) else {}
        for key in ("max_size", "max_age"):
            if isinstance(s3, dict) and s3.get(key) is not None:
                raise ConfigError(f"storage.s3.{key}: needs coordination.redis (the bucket's last uses are kept there)")
        return None
    spec = _mapping(value, "coordination")
    _unknown(spec, _COORDINATION_KEYS, "coordination.")
    redis = spec.get("redis")
    try:
        RedisAddress.parse(redis if isinstance(redis, str) else "")
    except ValueError as e:
        raise ConfigError(f"coordination.redis: {e}") from None
    secret = spec.get("secret")
    if spec.get("secret_file") is not None:
        if secret is not None:
            raise ConfigError("coordination.secret: give secret or secret_file, not both")
        secret = _first_line(spec["secret_file"], "coordination.secret_file")
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigError("coordination.secret: expected a shared random string of at least 16 characters")
    advertise = spec.get("advertise")
    if advertise is not None:
        advertise = _check_url(advertise, "coordination.advertise").rstrip("/")
    return Coordination(redis, secret, advertise)


def _storage(value: Any, environ: Mapping[str, str]) -> Storage:
    storage = _mapping(value, "storage")
    _unknown(storage, _STORAGE_KEYS, "storage.")
    if storage.get("s3") is None:
        return Storage()
    spec = _mapping(storage["s3"], "storage.s3")
    _unknown(spec, _S3_KEYS, "storage.s3.")
    bucket = spec.get("bucket")
    if bucket is None:
        raise ConfigError("storage.s3.bucket: missing")
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"storage.s3.bucket: {bucket!r} is not a bucket name (3-63 of a-z, 0-9, '.', '-')")
    endpoint = spec.get("endpoint")
    if endpoint is not None:
        endpoint = _check_url(endpoint, "storage.s3.endpoint")
    region = spec.get("region", "us-east-1")
    if not isinstance(region, str) or not _REGION_RE.fullmatch(region):
        raise ConfigError(f"storage.s3.region: expected a region name like us-east-1, got {region!r}")
    prefix = spec.get("prefix") or ""
    if not isinstance(prefix, str) or prefix.startswith("/") or "//" in prefix or "\\" in prefix:
        raise ConfigError(f"storage.s3.prefix: expected a key prefix like dioproxy/ (no leading /), got {prefix!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    access_key = _secret(spec, "access_key", environ.get("AWS_ACCESS_KEY_ID"))
    secret_key = _secret(spec, "secret_key", environ.get("AWS_SECRET_ACCESS_KEY"))
    if (access_key is None) != (secret_key is None):
        raise ConfigError("storage.s3: access_key and secret_key go together (or neither, for boto3's own chain)")
    redirect = spec.get("redirect", False)
    if not isinstance(redirect, bool):
        raise ConfigError(f"storage.s3.redirect: expected true or false, got {redirect!r}")
    ttl = parse_duration(spec.get("redirect_ttl", 300), "storage.s3.redirect_ttl")
    if not 1 <= ttl <= _PRESIGN_MAX:
        raise ConfigError(f"storage.s3.redirect_ttl: expected 1s to 7d (what a presigned URL allows), got {ttl:g} s")
    max_size = parse_size(spec["max_size"], "storage.s3.max_size") if spec.get("max_size") is not None else None
    max_age = parse_duration(spec["max_age"], "storage.s3.max_age") if spec.get("max_age") is not None else None
    return Storage(
        S3Storage(bucket, endpoint, region, prefix, access_key, secret_key, redirect, ttl, max_size or None, max_age)
    )


def _secret(spec: dict, name: str, from_env: str | None) -> str | None:
    """``storage.s3.NAME``, else the first line of the file ``NAME_file``, else the environment's value."""
    key = f"storage.s3.{name}"
    value, path = spec.get(name), spec.get(name + "_file")
    if value is not None and path is not None:
        raise ConfigError(f"{key}: give {name} or {name}_file, not both")
    if path is not None:
        return _first_line(path, f"{key}_file")
    if value is None:
        return from_env or None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string")
    return value


def _first_line(path: Any, key: str) -> str:
    """The first line of the file ``path`` (a secret kept out of the config file)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}: expected a path, got {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


def _percent(value: Any, key: str) -> float:
    """``20%`` or ``20``: a share of something, 0 to 100."""
    text = value.strip().removesuffix("%") if isinstance(value, str) else value
    try:
        percent = float(text) if not isinstance(text, bool) else None
    except (TypeError, ValueError):
        percent = None
    if percent is None or not 0 <= percent <= 100:
        raise ConfigError(f"{key}: expected a percentage from 0 to 100 like 20%, got {value!r}")
    return percent


def _prefetch(value: Any, upstreams: dict[str, Upstream]) -> tuple[PrefetchImage, ...]:
    """``prefetch:``, a list of ``{image, platforms, every}``; the image's registry must be configured."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("prefetch: expected a list of {image, platforms, every}")
    images = []
    for i, spec in enumerate(value):
        key = f"prefetch[{i}]"
        spec = _mapping(spec, key)
        _unknown(spec, _PREFETCH_KEYS, key + ".")
        text = spec.get("image")
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{key}.image: expected an image like library/alpine:3.20 or ghcr.io/owner/img:tag")
        try:
            image = parse_image(text)
        except ValueError as e:
            raise ConfigError(f"{key}.image: {e}") from None
        if image.registry not in upstreams:
            raise ConfigError(f"{key}.image: {image.registry!r} is not among the upstreams")
        platforms = _strings(spec.get("platforms"), key + ".platforms")
        for platform in platforms:
            if not _PLATFORM_RE.fullmatch(platform):
                raise ConfigError(f"{key}.platforms: {platform!r} is not os/arch[/variant] (like linux/arm64)")
        every = parse_duration(spec.get("every", 3600), key + ".every")
        if every <= 0:
            raise ConfigError(f"{key}.every: must be more than 0")
        images.append(PrefetchImage(image.registry, image.name, image.reference, platforms, every))
    return tuple(images)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return tuple(value)


def _number(value: Any, key: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key}: expected a number >= 0, got {value!r}")
    return float(value)


def _networks(value: Any, key: str) -> tuple[str, ...]:
    networks = _strings(value, key)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {network!r} is not an address or network") from None
    return networks


def _security(data: dict, upstreams: dict[str, Upstream]) -> Security:
    auth = _mapping(data.get("auth"), "auth")
    _unknown(auth, _AUTH_KEYS, "auth.")
    access = {}
    for registry, rule in _mapping(data.get("access"), "access").items():
        key = f"access.{registry}"
        if registry not in upstreams:
            raise ConfigError(f"{key}: {registry!r} is not among the upstreams")
        rule = _mapping(rule, key)
        _unknown(rule, {"allow", "deny"}, key + ".")
        access[registry] = AccessRule(
            _strings(rule.get("allow"), key + ".allow"), _strings(rule.get("deny"), key + ".deny")
        )
    rate = _mapping(data.get("rate_limit"), "rate_limit")
    _unknown(rate, _RATE_KEYS, "rate_limit.")
    proxies = _networks(rate.get("trusted_proxies"), "rate_limit.trusted_proxies")
    tls = _mapping(data.get("tls"), "tls")
    _unknown(tls, _TLS_KEYS, "tls.")
    if bool(tls.get("cert")) != bool(tls.get("key")):
        raise ConfigError("tls: cert and key go together")
    rate_value = _number(rate.get("rate"), "rate_limit.rate", 0.0)
    return Security(
        htpasswd=auth.get("htpasswd"),
        token_ttl=parse_duration(auth.get("token_ttl", 300), "auth.token_ttl"),
        token_secret=auth.get("secret"),
        access=access,
        rate=rate_value,
        burst=int(_number(rate.get("burst"), "rate_limit.burst", max(1.0, rate_value * 2))),
        trusted_proxies=proxies,
        metrics_allow=_networks(auth.get("metrics_allow"), "auth.metrics_allow"),
        tls_cert=tls.get("cert"),
        tls_key=tls.get("key"),
    )


def load_config(path: str | None, upstream_overrides: list[str] = (), cache_dir: str | None = None) -> Config:
    data = None
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    return build_config(data, upstream_overrides, cache_dir)
