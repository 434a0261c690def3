"""Resident memory and CPU time of a server: sums over its whole process group, read from ``/proc``.

A group, not a pid: nginx has workers, and a ``--workers N`` dioproxy will too; what a user pays for is all of them.
The table reports the sum of RSS, as the issue asks; that counts a page shared by forked workers once per worker,
so the notes add the PSS (shared pages split between their users), the fairer figure for several processes.
Sampling runs in a thread of the bench process, which only reads ``/proc``; the server's own work is untouched.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .plan import MB

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def _group(pgid: int) -> list[tuple[str, list[bytes]]]:
    """(pid, stat fields after the command name) of every process in group ``pgid``, and of process ``pgid``
    itself: a server the test fixtures start (SeaweedFS, redis-server) stays in the bench's group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # the process ended while we looked
        # Fields after the parenthesised command name: state ppid pgrp session tty tpgid flags minflt cminflt
        # majflt cmajflt utime stime ...
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid or int(entry) == pgid:  # or the server's own process, in the bench's group
            found.append((entry, fields))
    return found


def group_rss(pgid: int) -> int:
    """Bytes resident in every process of process group ``pgid`` right now."""
    total = 0
    for pid, _ in _group(pgid):
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def group_pss(pgid: int) -> int:
    """Proportional set size of the group, in bytes: pages shared by several processes (forked workers share the
    interpreter and every module imported before the fork) count once in total, not once per process as in RSS."""
    total = 0
    for pid, _ in _group(pgid):
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, summed over its cores: how near the cores were to full
    while a figure was measured tells whether it was bound by them."""
    with open("/proc/stat", "rb") as f:
        # cpu user nice system idle iowait irq softirq steal ...
        ticks = [int(n) for n in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / TICK, sum(ticks) / TICK


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) the live processes of group ``pgid`` have used so far."""
    return sum(int(fields[11]) + int(fields[12]) for _, fields in _group(pgid)) / TICK


class Sampler:
    """Samples :func:`group_rss` (every ``interval`` s) and :func:`group_pss` (every fifth time, it costs more)
    between ``__enter__`` and ``__exit__``; keeps the peaks."""

    def __init__(self, pgid: int, interval: float = 0.1) -> None:
        self.pgid = pgid
        self.interval = interval
        self.samples: list[int] = []
        self.pss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pgid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(group_rss(self.pgid))
            if len(self.samples) % 5 == 1:
                self.pss.append(group_pss(self.pgid))
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(group_rss(self.pgid))

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=0) / 1e6

    @property
    def peak_pss_mb(self) -> float:
        return max(self.pss, default=0) / 1e6


#: What :func:`settle_page_cache` leaves free, in RAM and on the disk.
SETTLE_SPARE_RAM = 2 * 2**30
SETTLE_SPARE_DISK = 20 * 2**30


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def settle_page_cache(directory: Path) -> str:
    """Write a file as large as the free memory (less a spare) into ``directory`` and keep it: the page cache is
    then full of clean pages, as on any server that has run a while, and every later write recycles one of them.

    On a fresh virtual machine a page the guest has not used yet, or has handed back to the host, costs a fault
    in the host on first touch: writing a new file that stays in the cache ran at 245-320 MB/s here, against
    1.7-3.4 GB/s once the cache was full. Without this step each row would time how much of that toll its server
    happened to pay first, not the server. Returns what it did, for the notes.
    """
    size = _meminfo("MemFree") - SETTLE_SPARE_RAM
    disk = os.statvfs(directory)
    room = disk.f_bavail * disk.f_frsize - SETTLE_SPARE_DISK
    if size <= 0:
        return "the page cache was full already"
    if room < size:
        spare, needed = room / 2**30, size / 2**30
        return f"the page cache was not filled first ({spare:.0f} GiB spare on the disk, {needed:.0f} needed)"
    chunk = bytes(16 * 2**20)
    started = time.monotonic()
    fd = os.open(directory / "page-cache-filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        os.fsync(fd)  # clean pages: the kernel reclaims them as soon as anything needs one
    finally:
        os.close(fd)
    seconds = time.monotonic() - started
    return (
        f"before the servers started, a {size / 2**30:.1f} GiB file filled the page cache in {seconds:.0f} s "
        f"({size / seconds / MB:.0f} MB/s: the fresh pages' toll), so that every row writes into recycled pages"
    )
