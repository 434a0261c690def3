"""Resident memory of a server: the sum of RSS over its whole process group, sampled from ``/proc``.

A group, not a pid: nginx has workers, and a ``--workers N`` dioproxy will too; what a user pays for is all of them.
Sampling runs in a thread of the bench process, which only reads ``/proc``; the server's own work is untouched.
"""

from __future__ import annotations

import os
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def group_rss(pgid: int) -> int:
    """Bytes resident in every process of process group ``pgid`` right now."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # Fields after the parenthesised command name: state ppid pgrp ...
            if int(stat[stat.rindex(b")") + 2 :].split()[2]) != pgid:
                continue
            with open(f"/proc/{entry}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return total


class Sampler:
    """Samples :func:`group_rss` every ``interval`` seconds between ``start()`` and ``stop()``; keeps the peak."""

    def __init__(self, pgid: int, interval: float = 0.1) -> None:
        self.pgid = pgid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pgid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(group_rss(self.pgid))
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
