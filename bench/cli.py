"""``python -m bench``: set the stage, run the scenarios, write the table and the chart, clean up whatever happens.

The stage: the upstream (token service + CNCF registry, seeded), one rate-limited relay per proxy (the far link),
dioproxy and the CNCF registry in proxy mode each behind its relay, and nginx serving the same files from disk.
Every process is stopped on the way out, on failure and on Ctrl-C (SIGTERM too) alike; the scratch directory goes
with them unless ``--keep`` asks to keep it (the servers' logs are there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import clients, memory
from .plan import FULL, MB, QUICK, Plan
from .report import Row, chart, markdown, write_markdown
from .scenarios import SCENARIOS, Stage, say
from .servers import DEFAULT_PROXY_COMMAND, REPOSITORY, CncfProxy, DioProxy, Nginx, Relay, Server
from .upstream import MANIFEST_ACCEPT, Upstream


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short runs (the smoke test)")
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for performance.md and img/performance.png (default: docs/, or bench/out/ with --quick)",
    )
    parser.add_argument(
        "--proxy-command",
        default=DEFAULT_PROXY_COMMAND,
        help="how to start dioproxy (shell words); --port, --interface, --cache-dir, --upstream are appended",
    )
    parser.add_argument(
        "--proxy-arg", action="append", default=[], help="one more argument for the proxy, e.g. --proxy-arg=--workers=2"
    )
    parser.add_argument("--only", help="comma-separated scenarios to run, e.g. 1,3 (default: all)")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="sample dioproxy with py-spy during each measurement, into DIR"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (servers' logs) afterwards")
    return parser.parse_args(argv)


def proxy_command(args: argparse.Namespace) -> str:
    return " ".join([args.proxy_command, *map(shlex.quote, args.proxy_arg)])


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.profile and not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    out = args.out or (REPOSITORY / "bench" / "out" if args.quick else REPOSITORY / "docs")
    wanted = [s for s in SCENARIOS if not args.only or s in args.only.split(",")]
    # Explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    scratch = Path(tempfile.mkdtemp(prefix="dioproxy-bench-"))
    servers: list[Server] = []
    upstream: Upstream | None = None
    started = time.monotonic()
    load = os.getloadavg()[0]
    try:
        settled = memory.settle_page_cache(scratch) if plan.settle_page_cache else None
        if settled:
            say(settled)
        upstream = Upstream(scratch)
        stage = set_stage(plan, scratch, upstream, servers, proxy_command(args))
        stage.profile_dir = args.profile
        if settled:
            stage.notes.append(settled[0].upper() + settled[1:] + ".")
        rows: list[Row] = []
        for key in wanted:
            say(f"scenario {key}: {SCENARIOS[key].__name__}")
            rows += SCENARIOS[key](stage)
        rows.sort(key=lambda row: row.scenario)
        elapsed = time.monotonic() - started
        write_report(rows, stage, out, elapsed, args, load)
    finally:
        clients.kill_all()
        for server in reversed(servers):
            server.stop()
        if upstream is not None:
            upstream.stop()
        if args.keep:
            say(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f}s")
    return 0


def set_stage(plan: Plan, scratch: Path, upstream: Upstream, servers: list[Server], proxy_command: str) -> Stage:
    """Start and seed the upstream, then the servers; a server that fails to start is noted, not fatal."""
    say("starting the upstream (token service + CNCF registry) and seeding it")
    upstream.start()
    upstream.push_manifest_image()
    for name, size in (
        ("warm", plan.warm_blob),
        ("cold-1", plan.cold_blob),
        ("cold-16", plan.cold_blob),
        ("memory", plan.memory_blob),
    ):
        upstream.add_blob(name, size)
    upstream.push_image(plan.image_layer_mib)
    say("seeded; starting the relays, dioproxy, the CNCF proxy and nginx")
    files = scratch / "www"
    (files / "blobs").mkdir(parents=True)
    (files / "manifests").mkdir()
    (files / "manifests" / "benchhello").write_bytes(upstream.manifest)
    for name in ("warm", "memory"):
        os.link(upstream.blobs[name].path, files / "blobs" / name)
    relays = [Relay(scratch / f"relay-{n}", upstream.address, plan.link_rate) for n in ("ours", "cncf")]
    ours = DioProxy(scratch / "dioproxy", relays[0].url, proxy_command)
    cncf = CncfProxy(scratch / "cncf", relays[1].url)
    nginx = Nginx(scratch / "nginx", files, {"/manifests/": MANIFEST_ACCEPT.split(",")[0]})
    stage = Stage(plan, upstream, ours, cncf, nginx)
    for server in (*relays, ours, cncf, nginx):
        servers.append(server)
        try:
            server.start()
        except Exception as e:
            say(f"{server.name} did not start: {e}")
            stage.down[server.name] = str(e).splitlines()[0]
    for relay, proxy in zip(relays, (ours, cncf)):
        if relay.name in stage.down:
            stage.down.setdefault(proxy.name, f"its relay did not start: {stage.down[relay.name]}")
    return stage


def _version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr) else "?"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_report(
    rows: list[Row], stage: Stage, out: Path, elapsed: float, args: argparse.Namespace, load: float
) -> None:
    plan = stage.plan
    table = markdown(rows)
    print(table, flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setting = (
        f"{os.cpu_count()} cores ({_cpu()}), Python {platform.python_version()}, "
        f"CNCF registry {_version(['/usr/bin/docker-registry', '--version']).split()[-1]}, "
        f"{_version(['/usr/sbin/nginx', '-v'])}; proxy started as "
        f"`{proxy_command(args).replace(shlex.quote(sys.executable), 'python')}`"
    )
    sizes = (
        f"{'Quick' if args.quick else 'Full'} run in {elapsed:.0f} s: warm blob {plan.warm_blob / MB:.0f} MB, "
        f"cold blobs {plan.cold_blob / MB:.0f} MB, far link {plan.link_rate / MB:.0f} MB/s, "
        f"wrk {plan.wrk_seconds:g} s per server; 1-minute load average {load:.1f} when the run started "
        "(other work on the same cores)"
    )
    notes = [f"- {note}" for note in stage.notes]
    if stage.down:
        notes += [f"- {name} did not start: {why}" for name, why in stage.down.items()]
    image = out / "img" / "performance.png"
    try:
        chart(rows, image, when)
        picture = "![dioproxy vs the CNCF registry proxy vs nginx](img/performance.png)\n"
    except Exception as e:  # no matplotlib, no chart: the table still stands
        say(f"no chart: {type(e).__name__}: {e}")
        picture = f"(no chart: {type(e).__name__}: {e})\n"
    body = f"Measured {when} on {setting}.\n\n{sizes}.\n\n{table}\n{picture}\n" + "\n".join(notes)
    write_markdown(out / "performance.md", body)
    say(f"wrote {out / 'performance.md'} and {image}")


if __name__ == "__main__":
    sys.exit(main())
