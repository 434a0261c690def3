"""What the status page at ``/`` shows, gathered without blocking work: the page is read often and must be cheap.

- :class:`StatusBoard` is fed once per finished request (``Mirror.request_done``): per-minute traffic counters
  for the last day in fixed arrays (a ring buffer), and the most pulled repositories and tags (least recently
  pulled forgotten first). Memory is bounded whatever the traffic.
- :func:`page_data` adds the live state at the moment of the request: upstream health (``mirror.health``), the
  rate-limit budget the upstreams announced, fills in progress, the cache's size against its bound, and the
  client snippets for this mirror's address. The HTML page and the JSON answer are both built from it.
- Under ``--workers N`` each worker holds only its share of the traffic and of the fills: :func:`share` is a
  worker's raw part (what :mod:`dioproxy.siblings` serves on its socket), and :func:`page_data` given every share
  that answered merges them (counters summed, top lists merged, a fill listed once per digest). The cache size is
  read once: the index is shared. In a fleet, :mod:`dioproxy.fleet.presence` adds the replicas Redis has seen.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable
from urllib.parse import urlsplit

from dioproxy import __version__, snippets
from dioproxy.names import is_digest
from dioproxy.storage.cachedir import BLOB

MINUTES = 24 * 60
#: Outcomes served from the cache, and those whose bytes came from an upstream (while filling, or piped through).
CACHED = frozenset(("hit", "stale"))
FETCHED = frozenset(("miss", "pass"))
#: Repositories of its most pulled list a worker hands over (a few times the page's 10, so a repository just below
#: the top on each worker still adds up); the page's top is merged from these.
SHARED_TOP = 50


class Traffic:
    """Requests and bytes served from the cache vs fetched upstream, per minute, for the last ``minutes``.

    Each slot remembers which minute it holds; a slot from an older lap of the ring counts as empty.
    """

    def __init__(self, minutes: int = MINUTES) -> None:
        self.minutes = minutes
        self.stamp = [-1] * minutes
        self.hits = [0] * minutes
        self.misses = [0] * minutes
        self.cached_bytes = [0] * minutes
        self.fetched_bytes = [0] * minutes

    def add(self, now: float, cached: bool, nbytes: int) -> None:
        minute = int(now // 60)
        slot = minute % self.minutes
        if self.stamp[slot] != minute:
            self.stamp[slot] = minute
            self.hits[slot] = self.misses[slot] = self.cached_bytes[slot] = self.fetched_bytes[slot] = 0
        if cached:
            self.hits[slot] += 1
            self.cached_bytes[slot] += nbytes
        else:
            self.misses[slot] += 1
            self.fetched_bytes[slot] += nbytes

    def export(self, now: float) -> list[list[int]]:
        """The minutes of the last day that saw traffic: ``[minute, hits, misses, cached_bytes, fetched_bytes]``."""
        first = int(now // 60) - self.minutes + 1
        return [
            [self.stamp[s], self.hits[s], self.misses[s], self.cached_bytes[s], self.fetched_bytes[s]]
            for s in range(self.minutes)
            if self.stamp[s] >= first
        ]

    def absorb(self, rows: list[list[int]]) -> None:
        """Add another worker's :meth:`export` to ours (a minute older than what a slot holds is past the ring)."""
        for minute, hits, misses, cached, fetched in rows:
            slot = minute % self.minutes
            if self.stamp[slot] > minute:
                continue
            if self.stamp[slot] < minute:
                self.stamp[slot] = minute
                self.hits[slot] = self.misses[slot] = self.cached_bytes[slot] = self.fetched_bytes[slot] = 0
            self.hits[slot] += hits
            self.misses[slot] += misses
            self.cached_bytes[slot] += cached
            self.fetched_bytes[slot] += fetched

    def window(self, now: float, span: int, step: int) -> dict[str, Any]:
        """The last ``span`` minutes in buckets of ``step`` minutes (oldest first), and their totals."""
        last = int(now // 60)
        first = last - span + 1
        buckets = []
        for start in range(first, last + 1, step):
            bucket = {"start": start * 60, "hits": 0, "misses": 0, "cached_bytes": 0, "fetched_bytes": 0}
            for minute in range(start, min(start + step, last + 1)):
                slot = minute % self.minutes
                if self.stamp[slot] == minute:
                    bucket["hits"] += self.hits[slot]
                    bucket["misses"] += self.misses[slot]
                    bucket["cached_bytes"] += self.cached_bytes[slot]
                    bucket["fetched_bytes"] += self.fetched_bytes[slot]
            buckets.append(bucket)
        totals = {key: sum(b[key] for b in buckets) for key in ("hits", "misses", "cached_bytes", "fetched_bytes")}
        requests = totals["hits"] + totals["misses"]
        return {
            "minutes": span,
            "step_minutes": step,
            **totals,
            "hit_ratio": totals["hits"] / requests if requests else None,
            "buckets": buckets,
        }


class Popular:
    """Pulls (manifest GETs by tag) and bytes served per repository, and pulls per tag.

    At most ``max_repositories`` repositories and ``max_tags`` tags each; past that the least recently pulled
    is forgotten, so a crawler walking many names cannot grow memory, and what is pulled often stays.
    """

    def __init__(self, max_repositories: int = 500, max_tags: int = 20) -> None:
        self.max_repositories = max_repositories
        self.max_tags = max_tags
        self.repositories: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def add(self, registry: str, name: str, nbytes: int, now: float, tag: str | None, digest: str | None) -> None:
        key = (registry, name)
        repository = self.repositories.get(key)
        if repository is None:
            if tag is None:
                return  # blobs of a repository nobody pulled a tag of since we started: not worth a row
            repository = {"pulls": 0, "bytes": 0, "last_pull": None, "tags": OrderedDict()}
            self.repositories[key] = repository
            if len(self.repositories) > self.max_repositories:
                self.repositories.popitem(last=False)
        repository["bytes"] += nbytes
        if tag is None:
            return
        self.repositories.move_to_end(key)
        repository["pulls"] += 1
        repository["last_pull"] = now
        tags = repository["tags"]
        entry = tags.get(tag)
        if entry is None:
            entry = tags[tag] = {"pulls": 0, "last_pull": now, "digest": digest}
            if len(tags) > self.max_tags:
                tags.popitem(last=False)
        tags.move_to_end(tag)
        entry["pulls"] += 1
        entry["last_pull"] = now
        entry["digest"] = digest or entry["digest"]

    def export(self, n: int = SHARED_TOP, tags: int = 10) -> list[list[Any]]:
        """The ``n`` most pulled repositories, each with its ``tags`` most pulled tags, as
        ``[registry, name, pulls, bytes, last_pull, {tag: entry}]``: a worker's part of the merged top list."""
        return [
            [
                r["registry"],
                r["repository"],
                r["pulls"],
                r["bytes"],
                r["last_pull"],
                {t.pop("tag"): t for t in r["tags"]},
            ]
            for r in self.top(n, tags)
        ]

    def absorb(self, rows: list[list[Any]]) -> None:
        """Add another worker's :meth:`export` (pulls and bytes summed; the latest pull and its digest kept)."""
        for registry, name, pulls, nbytes, last_pull, tags in rows:
            repository = self.repositories.setdefault(
                (registry, name), {"pulls": 0, "bytes": 0, "last_pull": None, "tags": OrderedDict()}
            )
            repository["pulls"] += pulls
            repository["bytes"] += nbytes
            repository["last_pull"] = _latest(repository["last_pull"], last_pull)
            for tag, entry in tags.items():
                mine = repository["tags"].setdefault(tag, {"pulls": 0, "last_pull": entry["last_pull"], "digest": None})
                mine["pulls"] += entry["pulls"]
                if entry["last_pull"] >= mine["last_pull"] or mine["digest"] is None:
                    mine["digest"] = entry["digest"] or mine["digest"]
                mine["last_pull"] = max(mine["last_pull"], entry["last_pull"])

    def top(self, n: int = 10, tags: int = 5) -> list[dict[str, Any]]:
        """The ``n`` most pulled repositories, each with its ``tags`` most pulled tags."""
        ranked = sorted(self.repositories.items(), key=lambda item: (-item[1]["pulls"], -(item[1]["last_pull"] or 0)))
        result = []
        for (registry, name), repository in ranked[:n]:
            top_tags = sorted(repository["tags"].items(), key=lambda item: (-item[1]["pulls"], -item[1]["last_pull"]))
            result.append(
                {
                    "registry": registry,
                    "repository": name,
                    "pulls": repository["pulls"],
                    "bytes": repository["bytes"],
                    "last_pull": repository["last_pull"],
                    "tags": [{"tag": tag, **entry} for tag, entry in top_tags[:tags]],
                }
            )
        return result


class StatusBoard:
    """The history the status page shows, fed by ``Mirror.request_done`` once per finished request."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.traffic = Traffic()
        self.popular = Popular()

    def request_done(self, request: Any) -> None:
        outcome = getattr(request, "dioproxy_outcome", "-")
        if outcome not in CACHED and outcome not in FETCHED:
            return
        now = self.clock()
        nbytes = request.sentLength or 0
        self.traffic.add(now, outcome in CACHED, nbytes)
        name = getattr(request, "dioproxy_repository", None)
        if name is None:
            return
        tag = digest = None
        path = request.path or b""
        if request.method == b"GET" and request.code == 200 and b"/manifests/" in path:
            reference = path.rsplit(b"/", 1)[-1].decode("ascii", "replace")
            if not is_digest(reference):
                tag = reference
                digests = request.responseHeaders.getRawHeaders("Docker-Content-Digest") or [None]
                digest = digests[0]
        self.popular.add(str(getattr(request, "dioproxy_registry", "-")), name, nbytes, now, tag, digest)


def _latest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def share(mirror: Any, index: int = 0) -> dict[str, Any]:
    """This worker's raw part of the page, for the worker a browser reached (plain JSON-ready data, bounded: a
    day of minutes, the top of its most pulled list, its fills)."""
    board: StatusBoard = mirror.status
    return {
        "index": index,
        "started": board.started,
        "traffic": board.traffic.export(board.clock()),
        "popular": board.popular.export(),
        "fills": _fills(mirror),
    }


def page_data(
    mirror: Any, base_url: str, shares: list[dict[str, Any]] | None = None, workers: int = 1
) -> dict[str, Any]:
    """Everything the status page shows, as plain JSON-ready data; cheap (no disk, no upstream).

    ``shares``: under ``--workers``, the :func:`share` of each of the ``workers`` that answered, ours first.
    """
    board: StatusBoard = mirror.status
    now = board.clock()
    address = urlsplit(base_url).netloc
    secure = base_url.startswith("https:")
    registries = list(mirror.config.upstreams)
    traffic, popular, fills = board.traffic, board.popular, _fills(mirror)
    if shares is not None:
        traffic, popular = Traffic(), Popular(max_repositories=len(shares) * SHARED_TOP)
        for part in shares:
            traffic.absorb(part["traffic"])
            popular.absorb(part["popular"])
        fills = _merged_fills([part["fills"] for part in shares])
    presence = getattr(mirror, "presence", None)
    return {
        "version": __version__,
        "now": now,
        "started": min(part["started"] for part in shares) if shares else board.started,
        "url": base_url,
        "closed": mirror.gate is not None,
        "default_registry": mirror.config.default_registry,
        "workers": _workers(shares, workers) if shares is not None else None,
        "fleet": presence.snapshot(now) if presence is not None else None,
        "upstreams": _upstreams(mirror, registries, now),
        "fills": fills,
        "cache": _cache(mirror),
        "traffic": {"hour": traffic.window(now, 60, 1), "day": traffic.window(now, MINUTES, 15)},
        "popular": popular.top(),
        "snippets": client_snippets(address, registries, mirror.config.default_registry, secure),
    }


def _workers(shares: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """How many workers this page covers: those whose share came in time, and those left out."""
    answered = sorted(part["index"] for part in shares)
    return {
        "count": count,
        "answered": len(answered),
        "missing": [i for i in range(count) if i not in answered],
        "answered_by": shares[0]["index"],
    }


def _merged_fills(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per digest: the worker that runs the fill (else the one furthest along, following it from the
    disk) gives the progress; the clients reading it are summed over the workers."""
    rows: dict[str, dict[str, Any]] = {}
    for part in parts:
        for row in part:
            mine = rows.get(row["digest"])
            if mine is None:
                rows[row["digest"]] = dict(row)
                continue
            followers = mine["followers"] + row["followers"]
            if (row["owner"], row["written"]) > (mine["owner"], mine["written"]):
                mine.update(row)
            mine["followers"] = followers
    return sorted(rows.values(), key=lambda row: -row["written"])


def _upstreams(mirror: Any, registries: list[str], now: float) -> list[dict[str, Any]]:
    health = getattr(mirror, "health", None)
    known = health.snapshot() if health is not None else {}
    budget = getattr(mirror, "budget", None)
    limits = {(a["registry"], a["account"]): a for a in budget.snapshot()} if budget is not None else {}
    rows = []
    for registry in registries:
        entry = known.get(registry)
        client = mirror.clients.get(registry)
        account = client.allowance.account if client is not None else "anonymous"
        rows.append(
            {
                "registry": registry,
                "state": _state(entry, now) if health is not None else "unknown",
                "health": entry,
                "ratelimit": limits.get((registry, account)),  # the account we pull as now
            }
        )
    return rows


def _state(entry: dict[str, Any] | None, now: float) -> str:
    """ok | offline (inside the offline window) | failing (the last attempt failed) | unknown (not asked yet)."""
    if not entry:
        return "unknown"
    if (entry.get("offline_until") or 0) > now:
        return "offline"
    success, error_at = entry.get("last_success"), entry.get("last_error_at")
    if error_at is not None and (success is None or error_at > success):
        return "failing"
    return "ok" if success is not None else "unknown"


def _fills(mirror: Any) -> list[dict[str, Any]]:
    """The fills this process runs (``owner``) and those it follows from the disk for its clients (another
    worker runs them)."""
    if mirror.fills is None:
        return []
    pins = mirror.cache.pins if mirror.cache is not None else {}
    rows = []
    now = mirror.reactor.seconds()  # the clock fills are timed with
    own = list(mirror.fills.fills.values())
    for fill in own + list(mirror.fills.following.values()):
        elapsed = now - fill.started
        rate = fill.written / elapsed if elapsed > 0 else None
        rows.append(
            {
                "digest": fill.digest,
                "written": fill.written,
                "size": fill.size,
                "bytes_per_second": rate,
                "eta_seconds": (fill.size - fill.written) / rate if rate and fill.size is not None else None,
                "followers": len(pins.get((BLOB, fill.digest), ())),
                "owner": fill in own,
            }
        )
    return sorted(rows, key=lambda row: -row["written"])


def _cache(mirror: Any) -> dict[str, Any] | None:
    if mirror.cache is None:
        return None
    state = mirror.cache.state()
    return {
        "size": state["cache_size"],
        "max_size": state["max_size"] or None,
        "entries": state["cache_entries"],
        "pinned": state["pinned"],
        "ready": bool(state["ready"]),
    }


def client_snippets(address: str, registries: list[str], default: str, secure: bool) -> list[dict[str, Any]]:
    """Per client, the files a user copies to point it at this mirror (the templates ``client-config`` prints)
    and the command to run next."""
    others = [r for r in registries if r != "docker.io"]
    example = "alpine:latest" if default == "docker.io" else f"{default}/IMAGE:TAG"
    containerd = [
        {
            "path": f"/etc/containerd/certs.d/{registry}/hosts.toml",
            "text": snippets.containerd_hosts_toml(address, registry, secure),
        }
        for registry in registries
    ]
    containerd.append(
        {
            "path": "/etc/containerd/certs.d/_default/hosts.toml",
            "text": snippets.containerd_hosts_toml(address, None, secure),
        }
    )
    clients = []
    if "docker.io" in registries:
        clients.append(
            {
                "client": "Docker",
                "files": [
                    {"path": "/etc/docker/daemon.json", "text": snippets.render_docker_daemon_json(address, secure)}
                ],
                "then": "sudo systemctl reload docker   # dockerd mirrors docker.io images only",
            }
        )
    clients += [
        {
            "client": "Podman, Buildah, Skopeo",
            "files": [
                {
                    "path": "/etc/containers/registries.conf.d/50-dioproxy.conf",
                    "text": snippets.podman_registries_conf(address, others, secure),
                }
            ],
            "then": f"podman pull {example}",
        },
        {
            "client": "containerd",
            "files": containerd,
            "then": "ctr images pull --hosts-dir /etc/containerd/certs.d docker.io/library/alpine:latest",
        },
        {
            "client": "nerdctl",
            "files": [],
            "then": f"nerdctl pull {example}   # reads the containerd hosts.toml files above (its default --hosts-dir)",
        },
        {
            "client": "Kubernetes (containerd CRI)",
            "files": [{"path": "/etc/containerd/config.toml", "text": snippets.containerd_cri_config()}],
            "then": "sudo systemctl restart containerd   # on every node, with the containerd hosts.toml files",
        },
    ]
    return clients
