"""Load generators, each in its own process: ``wrk``, ``curl``, ``bench.fetch``, ``skopeo``.

Nothing is measured inside a server nor inside the bench process: a client that shares a process (or a GIL) with
what it measures measures itself. Every process started here is killed when it overstays, and
:func:`kill_all` ends any still running (the bench calls it on the way out, Ctrl-C included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.procs import tool

from .servers import REPOSITORY, _env

_running: set[subprocess.Popen] = set()


def _popen(argv: list[str], **kwargs: object) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)  # type: ignore[call-overload]
    _running.add(process)
    return process


def _finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        out, err = process.communicate()
        raise TimeoutError(f"{process.args[0]} ran over {timeout:.0f}s") from None  # type: ignore[index]
    finally:
        _running.discard(process)
    return out or "", err or ""


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def kill_all() -> None:
    for process in list(_running):
        _kill(process)
        with contextlib.suppress(Exception):
            process.wait(5)
        _running.discard(process)


def _run(argv: list[str], timeout: float) -> str:
    process = _popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPOSITORY)
    out, err = _finish(process, timeout)
    if process.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} exited {process.returncode}: {(err or out).strip()[-300:]}")
    return out


# -- wrk -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    requests: int
    errors: int


def wrk(url: str, seconds: float, connections: int = 32, headers: dict[str, str] | None = None) -> WrkResult:
    """``wrk`` with 2 threads (the machine's cores) and ``connections``; non-2xx answers count as errors."""
    argv = [shutil.which("wrk") or "/usr/bin/wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:g}s"]
    for key, value in (headers or {}).items():
        argv += ["-H", f"{key}: {value}"]
    out = _run([*argv, url], timeout=seconds + 30)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise RuntimeError(f"cannot read wrk's output: {out[-300:]}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return WrkResult(float(rate.group(1)), int(total.group(1)), errors)


# -- curl ----------------------------------------------------------------------------------------------------------

_CURL_FORMAT = "%{http_code} %{size_download} %{time_total}\\n"


def curl_streams(
    url: str | Sequence[str],
    streams: int,
    timeout: float = 300,
    redirected: bool = False,
    output: Path | None = None,
    into: Path | None = None,
) -> tuple[float, int, list[float]]:
    """``streams`` concurrent curls to /dev/null, all of which must answer 200.

    Returns the wall time until the last one ended, the bytes of all, and each curl's own ``time_total`` (which,
    unlike the wall time, excludes starting the curl process: that matters for a single stream of a fast server).
    ``redirected``: ``curl -L``, and the first answer must have been a redirect (its round trip is in the times).
    ``output``: a file to write instead of /dev/null (one stream). ``into``: a directory where stream ``i``
    writes the file ``stream-i`` (a client that keeps what it pulls pays for the disk writes too). Several URLs:
    the streams take them round robin (stream ``i`` the ``i % len(url)``-th), e.g. a crowd spread over replicas.
    """
    urls = [url] if isinstance(url, str) else list(url)
    argv = [shutil.which("curl") or "/usr/bin/curl", "-s", *(["-L"] if redirected else [])]
    argv += ["-w", _CURL_FORMAT.replace("\\n", " %{num_redirects}\\n")]

    def target(i: int) -> str:
        return str(into / f"stream-{i}") if into is not None else str(output or "/dev/null")

    started = time.monotonic()
    processes = [
        _popen([*argv, urls[i % len(urls)], "-o", target(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(streams)
    ]
    total, times, failures = 0, [], []
    for process in processes:
        out, err = _finish(process, timeout)
        fields = out.split()
        if process.returncode != 0 or len(fields) < 4 or fields[0] != "200":
            failures.append(f"curl exit {process.returncode} {out.strip()} {err.strip()[-100:]}")
        elif redirected and fields[3] == "0":
            failures.append("answered 200 without a redirect")
        else:
            total += int(fields[1])
            times.append(float(fields[2]))
    wall = time.monotonic() - started
    if failures:
        raise RuntimeError("; ".join(failures[:3]))
    return wall, total, times


def curl_answer(url: str, timeout: float = 60) -> tuple[int, float]:
    """One ``curl`` that follows nothing: (HTTP status, curl's own ``time_total``), e.g. the cost of a redirect."""
    argv = [shutil.which("curl") or "/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", url]
    code, seconds = _run(argv, timeout).split()
    return int(code), float(seconds)


def curl_upload(url: str, path: Path, timeout: float = 300) -> tuple[int, float]:
    """``curl -T path url`` (a PUT of the file, e.g. to a presigned URL), which must answer 200: (bytes sent,
    curl's own ``time_total``)."""
    argv = [shutil.which("curl") or "/usr/bin/curl", "-s", "-o", "/dev/null", "-T", str(path)]
    argv += ["-w", "%{http_code} %{size_upload} %{time_total}\\n", url]
    out = _run(argv, timeout)
    fields = out.split()
    if len(fields) < 3 or fields[0] != "200":
        raise RuntimeError(f"curl -T: {out.strip()[-200:]}")
    return int(fields[1]), float(fields[2])


def slow_readers(url: str, count: int, rate: int, seconds: float) -> list[int]:
    """``count`` curls reading ``url`` at ``rate`` bytes/s each for ``seconds``; the bytes each one got.

    ``--limit-rate`` makes curl stop reading, so TCP pushes back on the server exactly as a client on a thin link
    does; ``--max-time`` ends them (exit 28), or they end early having read everything (exit 0).
    """
    argv = [
        shutil.which("curl") or "/usr/bin/curl",
        "-s",
        "-o",
        "/dev/null",
        "--limit-rate",
        str(rate),
        "--max-time",
        f"{seconds:g}",
        "-w",
        _CURL_FORMAT,
        url,
    ]
    processes = [_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    got, failures = [], []
    for process in processes:
        out, _ = _finish(process, seconds + 30)
        fields = out.split()
        if process.returncode not in (0, 28) or len(fields) < 2 or fields[0] not in ("200", "000"):
            failures.append(f"curl exit {process.returncode} {out.strip()}")
        got.append(int(fields[1]) if len(fields) >= 2 else 0)
    if failures:
        raise RuntimeError(f"{len(failures)}/{count} slow readers failed: {failures[0]}")
    if not all(got):
        raise RuntimeError(f"{got.count(0)}/{count} slow readers received nothing")
    return got


# -- bench.fetch ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    wall: float
    ttfb: float
    total: float
    #: ``time.monotonic()`` when the last download ended (one clock for every process on Linux).
    end: float


def fetch(url: str, clients: int, digest: str, timeout: float = 300) -> Fetch:
    """``clients`` concurrent verified downloads by :mod:`bench.fetch`: wall time, and first client's TTFB/total."""
    out = _run([sys.executable, "-m", "bench.fetch", url, "--clients", str(clients), "--digest", digest], timeout)
    answer = json.loads(out)
    bad = [c for c in answer["clients"] if c["status"] != 200 or not c.get("digest_ok") or c["error"]]
    if bad:
        c = bad[0]
        raise RuntimeError(
            f"{len(bad)}/{clients} downloads failed: HTTP {c['status']}, {c['bytes']} bytes, "
            f"digest ok {c.get('digest_ok')}, {c['error']}"
        )
    first = min(answer["clients"], key=lambda c: c["ttfb"])
    ends = [c["end"] for c in answer["clients"]]
    return Fetch(answer["wall"], first["ttfb"], max(c["total"] for c in answer["clients"]), max(ends))


# -- skopeo --------------------------------------------------------------------------------------------------------


def skopeo_pull(registry: str, reference: str, timeout: float = 300) -> float:
    """Seconds for ``skopeo copy docker://REGISTRY/REFERENCE oci:TMP`` (plain HTTP), into a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="dioproxy-bench-pull-") as directory:
        argv = [
            tool("/usr/bin/skopeo"),
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{registry}/{reference}",
            f"oci:{directory}/image:latest",
        ]
        started = time.monotonic()
        _run(argv, timeout)
        return time.monotonic() - started
