"""The side-by-side benchmark of issue 4: dioproxy against the CNCF registry's proxy mode and nginx.

``python -m bench`` (or ``make bench``) runs it; ``docs/performance.md`` explains what it measures and shows the
last full run. Clients and servers each run in their own processes; this package only orchestrates and reports.
"""
