"""How big and how long: the full run (the numbers in ``docs/performance.md``) and ``--quick`` (the smoke test).

The full sizes are the issues': a 256 MB warm blob (from the hot tier and from the bucket too), a ~50 MB/s far
link, 32 readers at 4 MB/s, wrk for 10 s. The cold blobs are 100 MB so that one download takes 2 s on the link:
long enough for time-to-first-byte to mean something, short enough to keep the whole run under ten minutes on two
cores. ``--quick`` keeps every step and shrinks every size so that a broken step still breaks, in well under a
minute.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1_000_000


@dataclass(frozen=True)
class Plan:
    warm_blob: int = 256 * MB
    cold_blob: int = 100 * MB
    memory_blob: int = 256 * MB
    image_layer_mib: int = 64
    #: The far upstream link, bytes per second in total (shared by every connection through one relay).
    link_rate: float = 50 * MB
    #: wrk's time per server, split into ``wrk_rounds`` runs taken in turn with the other servers.
    wrk_seconds: float = 12.0
    wrk_rounds: int = 3
    wrk_connections: int = 32
    warm_streams: int = 8
    cold_clients: int = 16
    slow_readers: int = 32
    slow_rate: int = 4 * MB
    slow_seconds: float = 15.0
    #: Repetitions of the short measurements (warm pulls); the median is reported.
    repeats: int = 3
    #: Rounds of the warm-blob measurements (single stream; half as many of the parallel ones), servers in turn.
    rounds: int = 6
    memory_target_mb: float = 150.0
    #: Scenario 6 (the shared tier): one fresh blob of this size per round, each uploaded, read and redirected.
    tier_blob: int = 256 * MB
    tier_rounds: int = 5
    #: Scenario 7 (``--workers 2`` against 1): rounds of the cold to-disk rows, two fresh blobs per mirror each.
    worker_rounds: int = 3
    #: Scenario 8 (3 replicas against the CNCF pair on shared storage): rounds, five fresh cold blobs each.
    fleet_rounds: int = 3
    #: Fill the page cache before measuring (``memory.settle_page_cache``): a server that has run for a while
    #: writes into recycled pages, not fresh ones.
    settle_page_cache: bool = True

    @property
    def link_floor(self) -> float:
        """Seconds one cold blob needs on the link at best: the cold-total floor of any proxy."""
        return self.cold_blob / self.link_rate


FULL = Plan()

QUICK = Plan(
    warm_blob=8 * MB,
    cold_blob=4 * MB,
    memory_blob=8 * MB,
    image_layer_mib=1,
    link_rate=20 * MB,
    wrk_seconds=1.0,
    wrk_rounds=1,
    slow_seconds=2.0,
    repeats=1,
    rounds=1,
    tier_blob=8 * MB,
    tier_rounds=1,
    worker_rounds=1,
    fleet_rounds=1,
    settle_page_cache=False,
)
