"""The status page as HTML, from :func:`dioproxy.status.page_data`: server-rendered, a little inline CSS, inline SVG
charts, no script and nothing fetched from elsewhere (the mirror may be offline; ``CSP`` forbids it anyway).

Every value that reaches the page goes through :func:`esc`: repository names, tags and upstream error messages
come from outside.
"""

from __future__ import annotations

import html
import time
from typing import Any

from dioproxy.admin import human

#: No script, no request to anywhere (a ``data:`` favicon stops the browser asking us for /favicon.ico).
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

STYLE = """
:root{--fg:#1d2330;--muted:#5f6b7a;--line:#dde2e8;--bg:#f6f7f9;--card:#fff;--ok:#2e9e5b;--warn:#d98a00;
--bad:#c8372d;--cache:#2e9e5b;--fetch:#e39b1b;--ratio:#3867d6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#1f2a3a;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}header p{margin:2px 0 0;color:#c3cad4}
header a{color:#fff}
nav a{margin-right:14px}
main{max-width:1100px;margin:0 auto;padding:8px 24px 32px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 18px;margin:16px 0}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:var(--muted)}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.ok{background:var(--ok)}.offline,.failing{background:var(--bad)}.unknown{background:#8a94a3}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:12px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:20px}
progress{width:100%;height:14px}
.bar{height:14px;background:#e8ebef;border-radius:7px;overflow:hidden}
.bar span{display:block;height:100%;background:var(--ratio)}
pre{background:#f1f3f6;border:1px solid var(--line);border-radius:6px;padding:8px 10px;overflow:auto;margin:4px 0}
code{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
details{border-top:1px solid var(--line);padding:6px 0}summary{cursor:pointer;font-weight:600}
p.path{margin:8px 0 0}pre.then{background:#1f2a3a;color:#e8ecf1}
.legend span{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 12px}
svg text{font:11px system-ui,sans-serif;fill:var(--muted)}
.err{color:var(--bad);word-break:break-word}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def when(t: float | None, now: float) -> str:
    """``3 min ago`` (or ``in 20 s``), the exact UTC time in a tooltip."""
    if t is None:
        return '<span class="muted">never</span>'
    exact = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    delta = now - t
    text = ("in " if delta < 0 else "") + _span(abs(delta)) + ("" if delta < 0 else " ago")
    return f'<time datetime="{esc(exact)}" title="{esc(exact)}">{esc(text)}</time>'


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def render(data: dict[str, Any]) -> str:
    host = data["url"].split("://", 1)[-1]
    now = data["now"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>dioproxy at {esc(host)}</title><style>{STYLE}</style></head><body>",
        f"<header><h1>dioproxy mirror at {esc(host)}</h1>",
        f"<p>version {esc(data['version'])} &middot; up {esc(_span(now - data['started']))} &middot; "
        f"{_worker_count(data)}"
        f"{'login required' if data['closed'] else 'open to all'} &middot; as JSON with "
        '<code>Accept: application/json</code> &middot; <a href="/metrics">metrics</a></p>',
        '<nav><a href="#health">Is it working</a><a href="#holds">What it holds</a><a href="#use">How to use it</a>'
        "</nav></header><main>",
        _health(data, now),
        _processes(data, now),
        _traffic(data),
        _fills(data),
        _holds(data, now),
        _use(data),
        f'<p class="muted">Generated {esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))}; '
        "reload for fresh numbers.</p></main></body></html>",
    ]
    return "\n".join(parts)


def _health(data: dict[str, Any], now: float) -> str:
    rows = []
    hub = None
    for up in data["upstreams"]:
        health = up["health"] or {}
        limit = up["ratelimit"]
        if up["registry"] == "docker.io":
            hub = limit
        error = health.get("last_error")
        error_cell = (
            f'<span class="err">{esc(error)}</span><br><span class="muted">{when(health.get("last_error_at"), now)}'
            "</span>"
            if error
            else '<span class="muted">none</span>'
        )
        offline = health.get("offline_until")
        rows.append(
            f'<tr><td><b>{esc(up["registry"])}</b></td><td><span class="badge {esc(up["state"])}">'
            f"{esc(up['state'])}</span></td><td>{when(health.get('last_success'), now) if up['health'] else '-'}</td>"
            f"<td>{error_cell if up['health'] else '-'}</td>"
            f"<td>{when(offline, now) if offline and offline > now else '-'}</td>"
            f'<td class="num">{_budget(limit)}</td></tr>'
        )
    hub_line = ""
    if hub is not None:
        hub_line = (
            f"<p>Docker Hub pull budget ({esc(hub['account'])}): <b>{esc(hub['remaining'])}</b>"
            f"{' of ' + esc(hub['limit']) if hub.get('limit') else ''} manifest pulls left"
            f"{_budget_state(hub)} "
            f'<span class="muted">(announced {when(hub["at"], now)})</span></p>'
        )
    return (
        '<section id="health"><h2>Is it working?</h2>'
        "<table><thead><tr><th>Upstream</th><th>State</th><th>Last success</th><th>Last error</th>"
        '<th>Offline until</th><th class="num">Rate-limit left</th></tr></thead><tbody>'
        + "".join(rows)
        + f"</tbody></table>{hub_line}</section>"
    )


def _worker_count(data: dict[str, Any]) -> str:
    workers = data.get("workers")
    return f"{esc(workers['count'])} workers &middot; " if workers else ""


def _processes(data: dict[str, Any], now: float) -> str:
    """Under ``--workers``: how many workers this page covers. In a fleet: Redis, and the replicas it has seen."""
    parts = []
    workers = data.get("workers")
    if workers is not None:
        count, answered = workers["count"], workers["answered"]
        line = f"{esc(answered)} of {esc(count)} workers answered"
        if workers["missing"]:
            missing = ", ".join(esc(i) for i in workers["missing"])
            line = (
                f'<span class="badge failing">{line}</span> <span class="muted">worker {missing} left out: '
                "its traffic and downloads are missing from this page</span>"
            )
        else:
            line = f'<span class="badge ok">{line}</span>'
        parts.append(
            f'<p id="workers-line">{line} <span class="muted">(this page came from worker '
            f"{esc(workers['answered_by'])})</span></p>"
        )
    fleet = data.get("fleet")
    if fleet is not None:
        if fleet["redis"] == "down":
            parts.append(
                '<p id="fleet-line"><span class="badge offline">coordination unreachable</span> Redis does not '
                f"answer (since {when(fleet['down_since'], now)}): each replica fetches on its own. "
                f'<span class="err">{esc(fleet["error"] or "")}</span></p>'
            )
        elif fleet["redis"] == "unknown":
            parts.append('<p id="fleet-line"><span class="badge unknown">unknown</span> Redis not asked yet.</p>')
        else:
            rows = [
                f"<tr><td><code>{esc(r['url'])}</code>{' (this one)' if r['url'] == fleet['me'] else ''}</td>"
                f"<td>{esc(', '.join(str(v) for v in r['versions']))}</td><td>{when(r['started'], now)}</td>"
                f'<td class="num">{esc(r["workers"])}</td><td class="num">{esc(r["fills"])}</td>'
                f"<td>{when(r['last_seen'], now)}</td></tr>"
                for r in fleet["replicas"]
            ]
            parts.append(
                f'<p id="fleet-line"><span class="badge ok">Redis up</span> {len(rows)} '
                f"replica{'s' if len(rows) != 1 else ''} seen in the last {esc(_span(fleet['ttl']))} "
                f'<span class="muted">(checked {when(fleet["checked"], now)})</span></p>'
                '<table id="replicas"><thead><tr><th>Replica</th><th>Version</th><th>Started</th>'
                '<th class="num">Processes</th><th class="num">Downloads</th><th>Last seen</th></tr></thead><tbody>'
                + "".join(rows)
                + "</tbody></table>"
            )
    if not parts:
        return ""
    return '<section id="processes"><h2>Workers and replicas</h2>' + "".join(parts) + "</section>"


def _budget(limit: dict[str, Any] | None) -> str:
    if not limit or limit["remaining"] is None:
        return '<span class="muted">-</span>'
    of = f" / {esc(limit['limit'])}" if limit.get("limit") else ""
    return f"{esc(limit['remaining'])}{of}{_budget_state(limit)}"


def _budget_state(limit: dict[str, Any]) -> str:
    """What the mirror does about it (dioproxy.budget): nothing said while there is plenty."""
    if limit["state"] == "low":
        return ' <span class="badge failing">low: cached tags kept</span>'
    if limit["state"] == "gone":
        return f' <span class="badge offline">used up: back in ~{esc(limit["retry_in"])} s</span>'
    return ""


def _traffic(data: dict[str, Any]) -> str:
    cards = []
    for key, label in (("hour", "last hour"), ("day", "last day")):
        window = data["traffic"][key]
        ratio = window["hit_ratio"]
        cards.append(
            f'<div class="card">Hit ratio, {label}<b>{"-" if ratio is None else f"{ratio:.0%}"}</b>'
            f'<span class="muted">{window["hits"] + window["misses"]} requests</span></div>'
            f'<div class="card">From cache, {label}<b>{esc(human(window["cached_bytes"]))}</b></div>'
            f'<div class="card">Fetched upstream, {label}<b>{esc(human(window["fetched_bytes"]))}</b></div>'
        )
    legend = (
        '<p class="legend muted"><span style="background:var(--cache)"></span>served from cache'
        '<span style="background:var(--fetch)"></span>fetched upstream'
        '<span style="background:var(--ratio)"></span>hit ratio (right axis)</p>'
    )
    return (
        '<section id="traffic"><h2>Traffic</h2><div class="cards">'
        + "".join(cards)
        + "</div><h3>Last hour, per minute</h3>"
        + chart(data["traffic"]["hour"], "traffic-hour")
        + "<h3>Last day, per 15 minutes</h3>"
        + chart(data["traffic"]["day"], "traffic-day")
        + legend
        + "</section>"
    )


def chart(window: dict[str, Any], ident: str) -> str:
    """Stacked bars of bytes (cache below, upstream above) per bucket, and the hit ratio as a line."""
    width, height, left, right, top, bottom = 1000, 170, 64, 44, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    buckets = window["buckets"]
    peak = max((b["cached_bytes"] + b["fetched_bytes"] for b in buckets), default=0) or 1
    step = plot_w / max(1, len(buckets))
    shapes = []
    points: list[str] = []
    for i, b in enumerate(buckets):
        x = left + i * step
        base = top + plot_h
        for nbytes, color in ((b["cached_bytes"], "var(--cache)"), (b["fetched_bytes"], "var(--fetch)")):
            if nbytes:
                h = max(1.0, nbytes / peak * plot_h)
                base -= h
                shapes.append(
                    f'<rect x="{x + step * 0.1:.1f}" y="{base:.1f}" width="{step * 0.8:.1f}" height="{h:.1f}" '
                    f'style="fill:{color}"/>'
                )
        requests = b["hits"] + b["misses"]
        if requests:
            y = top + plot_h * (1 - b["hits"] / requests)
            points.append(f"{'L' if points else 'M'}{x + step / 2:.1f},{y:.1f}")
        elif points and not points[-1].startswith("|"):
            points.append("|")  # a gap: the next point starts a new line
    path = _restart_after_gaps(points)
    if path:
        shapes.append(f'<path d="{path}" style="fill:none;stroke:var(--ratio);stroke-width:2"/>')
    labels = [
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{esc(human(peak))}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
        f'<text x="{width - right + 6}" y="{top + 10}">100%</text>',
        f'<text x="{width - right + 6}" y="{top + plot_h}">0%</text>',
    ]
    if buckets:
        for i in (0, len(buckets) // 2):
            stamp = time.strftime("%H:%M", time.gmtime(buckets[i]["start"]))
            labels.append(f'<text x="{left + i * step:.1f}" y="{height - 6}">{esc(stamp)} UTC</text>')
        labels.append(f'<text x="{width - right}" y="{height - 6}" text-anchor="end">now</text>')
    empty = ""
    if not window["hits"] + window["misses"]:
        empty = f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">no traffic yet</text>'
    return (
        f'<svg id="{esc(ident)}" class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="bytes served per bucket and hit ratio" xmlns="http://www.w3.org/2000/svg">'
        f"<title>bytes from cache and fetched upstream, hit ratio</title>"
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" style="stroke:#c5ccd5"/>'
        + "".join(shapes)
        + "".join(labels)
        + empty
        + "</svg>"
    )


def _restart_after_gaps(points: list[str]) -> str:
    out, restart = [], True
    for p in points:
        if p == "|":
            restart = True
            continue
        out.append(("M" + p[1:]) if restart else p)
        restart = False
    return " ".join(out)


def _fills(data: dict[str, Any]) -> str:
    fills = data["fills"]
    if not fills:
        body = '<p class="muted">No blob is being downloaded right now.</p>'
    else:
        rows = []
        for f in fills:
            size = f["size"]
            rate = f["bytes_per_second"]
            progress = f'<progress value="{f["written"]}" max="{size}"></progress>' if size else "<progress></progress>"
            details = [f"{esc(human(f['written']))} of {esc(human(size)) if size else 'unknown size'}"]
            if rate:
                details.append(f"{esc(human(rate))}/s")
            if f["eta_seconds"] is not None:
                details.append(f"{esc(_span(f['eta_seconds']))} left")
            details.append(f"{f['followers']} client{'s' if f['followers'] != 1 else ''} reading")
            rows.append(
                f'<tr><td><code title="{esc(f["digest"])}">{esc(f["digest"][:19])}&hellip;</code></td>'
                f"<td>{progress}</td><td>{' &middot; '.join(details)}</td></tr>"
            )
        body = "<table><thead><tr><th>Blob</th><th>Progress</th><th>Bytes, rate, clients</th></tr></thead><tbody>"
        body += "".join(rows) + "</tbody></table>"
    return f'<section id="fills"><h2>Downloads in progress</h2>{body}</section>'


def _holds(data: dict[str, Any], now: float) -> str:
    cache = data["cache"]
    if cache is None:
        summary = '<p class="muted">Caching is off: every request is passed through to the upstream.</p>'
    else:
        entries = ", ".join(f"{esc(count)} {esc(kind)}s" for kind, count in sorted(cache["entries"].items()))
        bound = cache["max_size"]
        if bound:
            share = min(1.0, cache["size"] / bound)
            summary = (
                f"<p><b>{esc(human(cache['size']))}</b> of {esc(human(bound))} ({share:.0%}) &middot; {entries}</p>"
                f'<div class="bar" role="meter" aria-valuenow="{cache["size"]}" aria-valuemax="{bound}">'
                f'<span style="width:{share * 100:.1f}%"></span></div>'
            )
        else:
            summary = f"<p><b>{esc(human(cache['size']))}</b> (no size bound) &middot; {entries}</p>"
        if not cache["ready"]:
            summary += '<p class="muted">Still indexing the cache directory after the start.</p>'
    popular = data["popular"]
    if popular:
        rows = []
        for repo in popular:
            tags = ", ".join(
                f'<code title="{esc(t["digest"] or "")}">{esc(t["tag"])}</code> '
                f'<span class="muted">&times;{esc(t["pulls"])}</span>'
                for t in repo["tags"]
            )
            rows.append(
                f"<tr><td><b>{esc(repo['registry'])}/{esc(repo['repository'])}</b></td><td>{tags}</td>"
                f'<td class="num">{esc(repo["pulls"])}</td><td class="num">{esc(human(repo["bytes"]))}</td>'
                f"<td>{when(repo['last_pull'], now)}</td></tr>"
            )
        table = (
            "<h3>Most pulled since the start</h3><table><thead><tr><th>Repository</th><th>Tags (pulls)</th>"
            '<th class="num">Pulls</th><th class="num">Served</th><th>Last pull</th></tr></thead><tbody>'
            + "".join(rows)
            + "</tbody></table>"
        )
    else:
        table = '<p class="muted">Nothing pulled since the start.</p>'
    return f'<section id="holds"><h2>What it holds</h2>{summary}{table}</section>'


def _use(data: dict[str, Any]) -> str:
    host = data["url"].split("://", 1)[-1]
    items = []
    for i, item in enumerate(data["snippets"]):
        files = "".join(
            f'<p class="path"><code>{esc(f["path"])}</code></p><pre><code>{esc(f["text"])}</code></pre>'
            for f in item["files"]
        )
        then = f'<pre class="then"><code>{esc(item["then"])}</code></pre>' if item["then"] else ""
        items.append(
            f'<details class="snippet"{" open" if i == 0 else ""}><summary>{esc(item["client"])}</summary>'
            f"{files}{then}</details>"
        )
    login = (
        f"<p>This mirror requires a login: <code>docker login {esc(host)}</code> (or <code>podman login</code>) "
        "with your user name and password first.</p>"
        if data["closed"]
        else ""
    )
    return (
        '<section id="use"><h2>How to use this mirror</h2>'
        f"<p>Point your clients at <code>{esc(host)}</code>; images keep their usual names. Pull directly with "
        f"<code>docker pull {esc(host)}/library/alpine:latest</code>, or configure each client:</p>"
        + login
        + "".join(items)
        + "</section>"
    )
