"""How long a large cache index stalls the reactor: ``python -m bench.index_lag [--entries 1000000]``.

Builds a cache directory of N entries (sparse files: real names, sizes and mtimes, no data blocks; 90 % blobs in
the 256 prefix directories, 10 % manifests), then drives the size bound through its phases while a lag probe (a
LoopingCall every 10 ms) records how late the reactor runs it: start (first, on a directory with no index, then
again), rescan, last uses written after 10k hits (the old snapshot, the new batch), eviction of 1 % by size, 1 % by
max_age, and stop; and the new code's first start on the directory the old code left (taking over its
``lastuse.json``). Once with the old code (``CacheBound`` of ``--old-rev``, the in-memory index and
``lastuse.json``, copied out of git into a temp package) and once with the new (the SQLite index), each in its own
process so neither pays for the other's garbage; prints both side by side with ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
#: The last commit with the in-memory index (before dioproxy/index.py).
OLD_REV = "674a458"
ENTRY_SIZE = 4096
TICK = 0.01
TARGET_MS = 100.0


def digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def is_manifest(i: int) -> bool:
    return i % 10 == 0


def entry_path(root: str, i: int) -> str:
    hexdigest = digest(i)[7:]
    if is_manifest(i):
        return os.path.join(root, "manifests", "sha256", hexdigest)
    return os.path.join(root, "blobs", "sha256", hexdigest[:2], hexdigest)


def build(root: str, entries: int, start: float) -> None:
    """N sparse entry files (those missing), entry i stored (mtime) i milliseconds after ``start``."""
    for sub in ("manifests/sha256", "repos", "tmp"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(256):
        os.makedirs(os.path.join(root, "blobs", "sha256", f"{i:02x}"), exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(entries):
        path = entry_path(root, i)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            continue
        os.ftruncate(fd, ENTRY_SIZE)
        os.close(fd)
        t = start + i / 1000
        os.utime(path, (t, t))


# -- one side, in a process of its own ----------------------------------------------------------------------------


def run_side(side: str, root: str, entries: int, old_package: str | None) -> dict:
    from twisted.internet import defer, reactor, task

    from dioproxy.pools import Pools

    upgrade = side == "upgrade"  # the new code's first start on the old code's directory (its lastuse.json)
    if side == "old":
        sys.path.insert(0, old_package)
        from old_dioproxy.eviction import CacheBound, IndexedStorage  # type: ignore[import-not-found]

        def make(storage):
            return CacheBound(storage, reactor, None, check_interval=0, snapshot_interval=0, rescan_interval=0)

        def size(bound):
            return bound.index.size

        def write_last_uses(bound):
            return bound.snapshot(force=True)

        pools = None
    else:
        from dioproxy.eviction import CacheBound, IndexedStorage

        pools = Pools(reactor)

        def make(storage):
            return CacheBound(storage, reactor, None, check_interval=0, rescan_interval=0, pools=pools)

        def size(bound):
            return bound.size

        def write_last_uses(bound):
            return bound.flush()

    results: dict = {}
    worst = [0.0]
    last = [time.monotonic()]

    def tick() -> None:
        now = time.monotonic()
        worst[0] = max(worst[0], now - last[0] - TICK)
        last[0] = now

    probe = task.LoopingCall(tick)

    @defer.inlineCallbacks
    def phase(name, work):
        yield task.deferLater(reactor, 0.1, lambda: None)
        worst[0], last[0] = 0.0, time.monotonic()
        began = time.monotonic()
        yield work()
        took = time.monotonic() - began
        yield task.deferLater(reactor, 0.05, lambda: None)  # a stall at the very end still counts
        results[name] = {"stall_ms": round(worst[0] * 1000, 1), "seconds": round(took, 2)}
        print(f"  {side} {name}: worst stall {worst[0] * 1000:.0f} ms over {took:.1f} s", file=sys.stderr)

    @defer.inlineCallbacks
    def settle(bound, bound_size=None):
        """Until the eviction has done its work (the old code evicts at once, the new in slices)."""
        while True:
            yield task.deferLater(reactor, 0.05, lambda: None)
            call = bound._check_call
            busy = getattr(bound, "_checking", False) or getattr(bound, "_check_again", False)
            busy = busy or (call is not None and call.active())
            if not busy and (bound_size is None or size(bound) <= bound_size):
                return

    @defer.inlineCallbacks
    def main():
        probe.start(TICK)
        storage = IndexedStorage(root, pools.disk) if pools is not None else IndexedStorage(root)
        if upgrade:
            bound = make(storage)
            yield phase("start, upgrading from lastuse.json", lambda: start(bound))
            yield bound.stop()
        else:
            yield run_phases(storage)
        probe.stop()
        if pools is not None:
            pools.stop()

    @defer.inlineCallbacks
    def start(bound):
        yield bound.start()
        yield bound.when_ready()

    @defer.inlineCallbacks
    def run_phases(storage):
        bound = make(storage)
        yield phase("start (no index yet)", lambda: start(bound))
        total = size(bound)
        results["entries"] = total // ENTRY_SIZE
        yield phase("stop (after the first start)", bound.stop)
        bound = make(storage)
        yield phase("start again", lambda: start(bound))
        yield phase("rescan", bound.rescan)

        rng = random.Random(1)
        hits = [rng.randrange(entries) for _ in range(10_000)]
        for n, i in enumerate(hits):  # 10k hits, 500 per tick: what a busy hour's hits look like, compressed
            bound.touch("manifest" if is_manifest(i) else "blob", digest(i))
            if n % 500 == 0:
                yield task.deferLater(reactor, TICK, lambda: None)
        yield phase("last uses written (10k hits)", lambda: write_last_uses(bound))

        target = total - total // 100

        def evict():
            bound.configure(target, None)
            return settle(bound, target)

        yield phase("evict 1% by size", evict)
        # The oldest 1 % left now are entries 1 %..2 % (entry i was stored i ms after the first).
        cutoff = os.stat(entry_path(root, entries * 2 // 100)).st_mtime

        def expire():
            bound.configure(None, time.time() - cutoff)
            return settle(bound)

        yield phase("expire 1% by max_age", expire)
        yield phase("stop", bound.stop)
        results["final_entries"] = size(bound) // ENTRY_SIZE

    def done(result):
        if hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()
    return results


# -- the driver ---------------------------------------------------------------------------------------------------


def old_package(rev: str, into: str) -> str:
    """The old ``eviction``/``cachedir`` modules as package ``old_dioproxy`` (the rest is today's dioproxy)."""
    package = os.path.join(into, "old_dioproxy")
    os.makedirs(package)
    open(os.path.join(package, "__init__.py"), "w").close()
    for module in ("eviction", "cachedir"):
        source = subprocess.run(
            ["git", "show", f"{rev}:dioproxy/{module}.py"], cwd=REPOSITORY, check=True, capture_output=True, text=True
        ).stdout
        source = source.replace("from dioproxy.cachedir import", "from old_dioproxy.cachedir import")
        source = source.replace("from dioproxy.storage import", "from dioproxy.storage.disk import")  # moved since
        with open(os.path.join(package, f"{module}.py"), "w") as f:
            f.write(source)
    return into


def child(side: str, root: str, entries: int, package: str | None) -> dict:
    argv = [sys.executable, "-m", "bench.index_lag", "--side", side, "--root", root, "--entries", str(entries)]
    if package:
        argv += ["--old-package", package]
    out = subprocess.run(argv, cwd=REPOSITORY, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def forget(root: str) -> None:
    """No index, no snapshot: as if no proxy had run on the directory yet."""
    for name in ("index.db", "index.db-wal", "index.db-shm", "lastuse.json"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            os.unlink(path)


def report(entries: int, old: dict, new: dict) -> str:
    lines = [
        f"reactor stalls with {entries:,} cache entries (LoopingCall every {TICK * 1000:.0f} ms; worst lateness)",
        "",
        "| phase | old: worst stall | new: worst stall | old/new | old: took | new: took |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    worst_new = 0.0
    for name, result in new.items():
        if not isinstance(result, dict):
            continue
        worst_new = max(worst_new, result["stall_ms"])
        before = old.get(name)
        if before is None:  # the old code has no such phase
            lines.append(f"| {name} | - | {result['stall_ms']:.0f} ms | - | - | {result['seconds']:.1f} s |")
            continue
        ratio = before["stall_ms"] / max(result["stall_ms"], 1.0)
        lines.append(
            f"| {name} | {before['stall_ms']:.0f} ms | {result['stall_ms']:.0f} ms | {ratio:.0f}x "
            f"| {before['seconds']:.1f} s | {result['seconds']:.1f} s |"
        )
    lines += [
        "",
        f"entries indexed: old {old.get('entries')}, new {new.get('entries')}; "
        f"left after eviction: old {old.get('final_entries')}, new {new.get('final_entries')}",
        f"target: no stall over {TARGET_MS:.0f} ms: {'met' if worst_new <= TARGET_MS else 'MISSED'} "
        f"(worst {worst_new:.0f} ms)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.index_lag", description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--dir", help="build the cache here (kept; reused if it already holds --entries)")
    p.add_argument("--old-rev", default=OLD_REV, help="git revision of the old code (default %(default)s)")
    p.add_argument("--side", choices=("old", "new", "upgrade"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--old-package", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, args.root, args.entries, args.old_package)))
        return 0
    scratch = tempfile.mkdtemp(prefix="index-lag-")
    try:
        root = args.dir or os.path.join(scratch, "cache")
        marker = os.path.join(root, ".bench")
        try:
            with open(marker) as f:
                built = json.load(f)
        except (OSError, ValueError):
            built = {}
        if built.get("entries") != args.entries:
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            built = {"entries": args.entries, "start": time.time() - args.entries / 1000 - 86400}
            with open(marker, "w") as f:
                json.dump(built, f)
        began = time.monotonic()
        build(root, args.entries, built["start"])
        print(f"{args.entries:,} entries ready in {time.monotonic() - began:.0f} s", file=sys.stderr)
        package = old_package(args.old_rev, os.path.join(scratch, "old"))
        results = {}
        for side in ("new", "old", "upgrade"):
            if side != "upgrade":  # which takes over the lastuse.json the old side left
                forget(root)
            results[side] = child(side, root, args.entries, package if side == "old" else None)
            build(root, args.entries, built["start"])  # the evicted entries back, for the next side
        forget(root)
        results["new"].update(results["upgrade"])
        print(report(args.entries, results["old"], results["new"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
