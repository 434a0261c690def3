"""The side-by-side benchmark of issue 4: dioproxy against the CNCF registry's proxy mode and nginx.

``python -m bench`` (or ``make bench``) runs it; ``docs/performance.md`` explains what it measures and shows the
last full run. Clients and servers each run in their own processes; this package only orchestrates and reports.

Scenario 8 (:mod:`bench.fleet`, issue 11) is the fleet: three replicas on one redis-server and one SeaweedFS bucket
behind one far link, a fresh cold blob per measurement to one curl, to 16 curls spread over the three and to 16 on
one replica, every file checked and every blob one upstream GET; its anchor is two CNCF proxies on one shared
storage directory, whose upstream GETs are counted as they come.
"""
