"""Scenario 8, the fleet (issue 11 section 4): a cold blob over 3 replicas against 16 clients on one, with the CNCF
registry's proxy mode on shared storage as the anchor, side by side in one run.

Three dioproxy replicas, each its own process and cache dir, with ``coordination`` on one real ``redis-server`` and
``storage.s3`` on one SeaweedFS bucket (``docs/scaling.md``), all behind one far link: a relay like the stage's,
the site's one uplink. The anchor: two CNCF ``docker-registry`` instances in proxy mode on one shared filesystem
storage directory, behind a relay of their own at the same rate. Each round seeds five fresh blobs (a blob is cold
once) and measures, the two in turn:

- one curl alone (dioproxy: a replica in turn; CNCF: its first instance);
- 16 concurrent curls spread round robin over the replicas' ports (6, 5, 5; the CNCF pair 8 and 8);
- dioproxy only: 16 concurrent curls on one replica (a replica in turn).

Every curl writes its own file (as in scenario 7), checked against the digest once the clock has stopped; the
upstream's access log counts the GETs that sent each blob. For dioproxy any count but 1 makes the round an error,
and so its row; the CNCF pair's count is reported as it is (each of its instances, and each concurrent client of
one, fetches on its own). Between measurements the bench waits, at most ``QUIET_DEADLINE`` s, until the replicas,
the CNCF instances and the relays are idle: a replica uploads each new blob to the bucket in the background.
Targets: 16 over 3 and 16 on 1 each ≤ 1.3x the time of one client, 1 upstream GET.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Sequence

import yaml

from .memory import group_cpu
from .plan import MB
from .report import Cell, Row, ratio
from .scenarios import Stage, _median, _ratios, attempt, say
from .servers import CncfProxy, DioProxy, Redis, Relay, Seaweed, Server
from .upstream import BlobFile
from .workers import COLD_TARGET, Download, _strict, _text, to_disk

REPLICAS = 3
CNCF_INSTANCES = 2
SECRET = "the bench fleet's shared secret"
PREFIX = "fleet/"
#: Idle: the watched processes used under QUIET_CPU seconds of CPU in the last QUIET_SPAN seconds.
QUIET_SPAN, QUIET_CPU, QUIET_DEADLINE = 0.5, 0.05, 30.0


class _Fleet:
    """The store, Redis, the replicas and their relay; the CNCF pair and theirs; where the curls write."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        base = stage.ours.base.parent / "fleet"
        rate = stage.plan.link_rate
        self.store = Seaweed(base / "seaweedfs")
        self.redis = Redis(base / "redis")
        self.relay = Relay(base / "relay", stage.upstream.address, rate)
        command = shlex.join(stage.ours.daemon.argv[: stage.ours.daemon.argv.index("--port")])
        self.replicas: list[DioProxy] = []
        for n in range(1, REPLICAS + 1):
            home = base / f"replica-{n}"
            config = home / "dioproxy.yaml"
            replica = DioProxy(home, self.relay.url, command, ["--config", str(config)], f"dioproxy (replica {n})")
            settings = {
                "coordination": {"redis": self.redis.url, "secret": SECRET, "advertise": replica.url},
                "storage": {"s3": self.store.weed.s3_settings(PREFIX)},
            }
            config.write_text(yaml.safe_dump(settings))
            self.replicas.append(replica)
        self.cncf_relay = Relay(base / "cncf-relay", stage.upstream.address, rate)
        shared = base / "cncf-storage"
        self.cncf = [
            CncfProxy(base / f"cncf-{n}", self.cncf_relay.url, shared, f"CNCF registry proxy ({n} of {CNCF_INSTANCES})")
            for n in range(1, CNCF_INSTANCES + 1)
        ]
        self.downloads = base / "downloads"
        self.downloads.mkdir(parents=True)
        self.waits: list[float] = []  # seconds each wait for quiet took

    def servers(self) -> list[Server]:
        return [self.store, self.redis, self.relay, *self.replicas, self.cncf_relay, *self.cncf]

    def start(self) -> None:
        """Each server, unless one it needs is down: then it is down too, saying which."""
        down = self.stage.down
        needs: dict[Server, list[Server]] = {
            **{replica: [self.store, self.redis, self.relay] for replica in self.replicas},
            **{proxy: [self.cncf_relay] for proxy in self.cncf},
        }
        for server in self.servers():
            missing = next((s for s in needs.get(server, []) if s.name in down), None)
            if missing is not None:
                down[server.name] = f"{missing.name} did not start: {down[missing.name]}"
                continue
            try:
                server.start()
            except Exception as e:
                say(f"{server.name} did not start: {e}")
                down[server.name] = str(e).splitlines()[0]

    def stop(self) -> None:
        for server in reversed(self.servers()):
            with contextlib.suppress(Exception):
                server.stop()

    def quiet(self) -> None:
        """Waits until the replicas, the CNCF instances and the relays are idle (at most ``QUIET_DEADLINE`` s)."""
        watched = [
            s.pid for s in (self.relay, *self.replicas, self.cncf_relay, *self.cncf) if s.name not in self.stage.down
        ]
        began = time.monotonic()
        used = sum(group_cpu(pid) for pid in watched)
        while time.monotonic() - began < QUIET_DEADLINE:
            time.sleep(QUIET_SPAN)
            before, used = used, sum(group_cpu(pid) for pid in watched)
            if used - before < QUIET_CPU:
                break
        else:
            say(f"fleet: still busy after {QUIET_DEADLINE:g} s; measuring anyway")
        self.waits.append(time.monotonic() - began)


def fleet(stage: Stage) -> list[Row]:
    """The cold rows of the fleet and its CNCF anchor (see the module's docstring)."""
    fleet = _Fleet(stage)
    try:
        fleet.start()
        return _cold(stage, fleet)
    finally:
        fleet.stop()


class _Runs:
    """One kind of measurement over the rounds: each round's time (or error), and what each download saw."""

    def __init__(self) -> None:
        self.cells: list[Cell] = []
        self.seen: list[Download | None] = []
        self.cpu: list[float] = []  # CPU seconds of the instances (all replicas, or both CNCF) per measurement

    def gets(self) -> str:
        return ", ".join("error" if d is None else str(d.gets) for d in self.seen) or "-"

    def others(self) -> int:
        return sum(d.others for d in self.seen if d is not None)


def _measure(
    stage: Stage, fleet: _Fleet, runs: _Runs, servers: Sequence[Server], blob: BlobFile, count: int, what: str
) -> None:
    """``count`` curls of ``blob`` round robin over ``servers``, into files; for dioproxy, 1 upstream GET or an
    error. The CPU time of every instance of its kind (the fill, serving, peers, the background upload) is kept.
    Then the wait for quiet."""
    seen: list[Download] = []
    strict = isinstance(servers[0], DioProxy)
    instances = [s.pid for s in (fleet.replicas if strict else fleet.cncf) if s.name not in stage.down]

    def run() -> float:
        into = fleet.downloads / f"{len(runs.cells)}-{count}-{len(servers)}-{servers[0].port}"
        before = sum(group_cpu(pid) for pid in instances)
        got = to_disk(stage, [s.url + blob.url_path() for s in servers], blob, count, into)
        runs.cpu.append(sum(group_cpu(pid) for pid in instances) - before)
        seen.append(got)
        if strict and got.gets != 1:
            raise RuntimeError(f"{got.gets} upstream GETs sent the blob for {count} clients, not 1")
        return got.wall

    runs.cells.append(attempt(stage, servers[0], what, run))
    runs.seen.append(seen[0] if seen else None)
    fleet.quiet()


def _cold(stage: Stage, fleet: _Fleet) -> list[Row]:
    """``fleet_rounds`` rounds of five fresh blobs: one client, 16 over the fleet, 16 on one replica; the CNCF
    pair's one client and 16 over both."""
    plan, upstream, crowd = stage.plan, stage.upstream, stage.plan.cold_clients
    replicas, cncf = fleet.replicas, fleet.cncf
    alone, spread, single, cncf_alone, cncf_spread = (_Runs() for _ in range(5))
    per_replica: list[str] = []  # each replica's curls' own times, per round of 16 over 3
    for r in range(plan.fleet_rounds):
        blob = {kind: upstream.add_blob(f"fleet-{kind}-{r}", plan.cold_blob) for kind in ("1", "3", "on1", "c1", "c2")}
        mine, other = replicas[r % REPLICAS], replicas[(r + 1) % REPLICAS]
        _measure(stage, fleet, alone, [mine], blob["1"], 1, "fleet: cold blob, 1 curl (s)")
        _measure(stage, fleet, cncf_alone, cncf[:1], blob["c1"], 1, "fleet: cold blob, 1 curl (s)")
        _measure(stage, fleet, spread, replicas, blob["3"], crowd, f"fleet: {crowd} curls over {REPLICAS} (s)")
        if spread.seen[-1] is not None:
            times = spread.seen[-1].times
            per_replica.append(
                ", ".join(f"{min(times[i::REPLICAS]):.2f}-{max(times[i::REPLICAS]):.2f}" for i in range(REPLICAS))
            )
        _measure(stage, fleet, cncf_spread, cncf, blob["c2"], crowd, f"fleet: {crowd} curls over {len(cncf)} (s)")
        _measure(stage, fleet, single, [other], blob["on1"], crowd, f"fleet: {crowd} curls on 1 replica (s)")
    ours_alone, theirs_alone = _median(alone.cells), _median(cncf_alone.cells)
    ours_spread, ours_single, theirs_spread = _strict(spread.cells), _strict(single.cells), _median(cncf_spread.cells)

    def rounds(a: _Runs, b: _Runs) -> str:
        return ", ".join(_text(ratio(m, o), 2) for o, m in zip(a.cells, b.cells))

    stage.notes.append(
        f"Scenario 8: {plan.fleet_rounds} rounds, five fresh {plan.cold_blob / MB:.0f} MB blobs each; the "
        f"{REPLICAS} replicas (one redis-server, one SeaweedFS bucket) share one {plan.link_rate / MB:.0f} MB/s far "
        f"link, the {len(cncf)} CNCF instances (one storage directory) another. Upstream GETs that sent the blob, "
        f"per round: dioproxy 1 client {alone.gets()}, {crowd} over {REPLICAS} {spread.gets()}, {crowd} on 1 "
        f"{single.gets()}; CNCF 1 client {cncf_alone.gets()}, {crowd} over {len(cncf)} {cncf_spread.gets()} "
        f"(besides, GETs answered 401: dioproxy {alone.others() + spread.others() + single.others()}, CNCF "
        f"{cncf_alone.others() + cncf_spread.others()}). {crowd} clients / one client per round: over {REPLICAS} "
        f"{rounds(alone, spread)}; on 1 {rounds(alone, single)}; CNCF over {len(cncf)} "
        f"{rounds(cncf_alone, cncf_spread)}. Each replica's curls' own times (s) in the {crowd} over {REPLICAS}, "
        f"per round: {'; '.join(per_replica) or '-'}. CPU seconds of all replicas (CNCF: both instances) per "
        f"measurement, each from the curls' start to the files checked (uploads included): 1 client {_cpu(alone)}; "
        f"{crowd} over {REPLICAS} {_cpu(spread)}; {crowd} on 1 {_cpu(single)}; CNCF 1 client {_cpu(cncf_alone)}, "
        f"{crowd} over {len(cncf)} {_cpu(cncf_spread)}. Waits for the fleet to be idle after each measurement: "
        f"{', '.join(f'{w:.1f}' for w in fleet.waits)} s."
    )
    size = f"{plan.cold_blob / MB:.0f} MB"
    growth, theirs_growth = ratio(ours_spread, ours_alone), ratio(theirs_spread, theirs_alone)
    on_one = ratio(ours_single, ours_alone)
    target = f"≤ {COLD_TARGET}x one client, 1 upstream GET"
    gets = [d.gets for d in spread.seen if d is not None]
    theirs_gets = [d.gets for d in cncf_spread.seen if d is not None]
    return [
        Row(
            "8",
            f"fleet of {REPLICAS}: cold {size} blob, 1 curl writing to disk: total",
            "s",
            ours_alone,
            theirs_alone,
            ratio=_ratios(
                (ratio(ours_alone, plan.link_floor), "link floor"), (ratio(ours_alone, theirs_alone), "CNCF")
            ),
        ),
        Row(
            "8",
            f"fleet of {REPLICAS}: cold {size} blob, {crowd} curls over {REPLICAS} replicas (CNCF: over "
            f"{len(cncf)} on one storage): total",
            "s",
            ours_spread,
            theirs_spread,
            ratio=(f"{growth:.2f}x one client" if growth is not None else "-")
            + (f" (CNCF {theirs_growth:.2f}x)" if theirs_growth is not None else ""),
            target=target,
            met=None if growth is None else growth <= COLD_TARGET,
        ),
        Row(
            "8",
            f"fleet of {REPLICAS}: cold {size} blob, {crowd} curls on 1 replica: total",
            "s",
            ours_single,
            ratio=_ratios((on_one, "one client"), (ratio(ours_single, ours_spread), f"over {REPLICAS}")),
            target=target,
            met=None if on_one is None else on_one <= COLD_TARGET,
        ),
        Row(
            "8",
            f"fleet of {REPLICAS}: cold blob, {crowd} curls over the instances: upstream blob GETs, most in a round",
            "GETs",
            max(gets) if gets else _first_error(spread.cells),
            max(theirs_gets) if theirs_gets else _first_error(cncf_spread.cells),
            ratio=f"per round: dioproxy {spread.gets()}; CNCF {cncf_spread.gets()}",
            target="exactly 1",
            met=None if not gets else max(gets) == 1,
            target_value=1,
        ),
    ]


def _cpu(runs: _Runs) -> str:
    return ", ".join(f"{c:.1f}" for c in runs.cpu) or "-"


def _first_error(cells: list[Cell]) -> Cell:
    return next((c for c in cells if isinstance(c, str)), "no round ran")
