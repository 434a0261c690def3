"""Pull measurements: time and upstream requests of every pull, for the closing note of the e2e work.

Each pull is appended to ``e2e-logs/pulls.jsonl`` (in trial's ``_trial_temp``) as it happens, and a table of all of
them is written to ``e2e-logs/pulls.txt`` and printed to stderr when the test run ends.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Pull:
    """One pull by one client: ``phase`` is ``cold`` (empty proxy cache), ``warm`` (cached) or ``offline``
    (cached, upstream registries stopped)."""

    client: str
    image: str
    phase: str
    seconds: float
    upstream: Counter = field(default_factory=Counter)
    proxy_requests: int = 0

    def upstream_summary(self) -> str:
        keys = sorted(k for k in self.upstream if not k.endswith(" total") and self.upstream[k])
        return ", ".join(f"{k}={self.upstream[k]}" for k in keys) or "none"


_pulls: list[Pull] = []
_lock = threading.Lock()
_out_dir: Path | None = None


def record(pull: Pull, out_dir: Path) -> None:
    global _out_dir
    with _lock:
        if _out_dir is None:
            atexit.register(_write_summary)
        _out_dir = out_dir
        _pulls.append(pull)
        with open(out_dir / "pulls.jsonl", "a") as f:
            f.write(json.dumps({**asdict(pull), "upstream": dict(pull.upstream)}) + "\n")


def table() -> str:
    header = f"{'client':<28} {'image':<24} {'phase':<8} {'seconds':>8} {'proxy reqs':>10}  upstream requests"
    lines = [header, "-" * len(header)]
    for p in _pulls:
        lines.append(
            f"{p.client:<28} {p.image:<24} {p.phase:<8} {p.seconds:>8.2f} {p.proxy_requests:>10}  "
            f"{p.upstream_summary()}"
        )
    return "\n".join(lines)


def _write_summary() -> None:
    if not _pulls or _out_dir is None:
        return
    text = table()
    (_out_dir / "pulls.txt").write_text(text + "\n")
    print(f"\nend-to-end pulls (also in {_out_dir / 'pulls.txt'}):\n{text}", file=sys.stderr)
