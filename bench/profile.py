"""``--profile DIR``: sample the proxy with py-spy while each of its measurements runs, and say where time went.

py-spy attaches to the running proxy from outside (``--nonblocking``: it never pauses the process, so the numbers
of a profiled run stay close to an unprofiled one) and writes collapsed stacks (``--format raw``: one line per
distinct stack, ``frame;frame;…;frame COUNT``). Those files feed flamegraph tools or speedscope; this module also
writes a short text summary next to each: the share of samples spent waiting in the reactor's poll (idle), and the
functions with the most samples on top of the stack (self) and anywhere in it (inclusive).

py-spy comes from PyPI (``pip install py-spy``) and needs ptrace rights on the proxy (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: A stack whose innermost frame is one of these is waiting, not working: the reactor's poll (epoll_wait is C, so
#: ``doPoll`` is the innermost Python frame) or an idle thread-pool worker.
IDLE = re.compile(r"(\.doPoll|\.doSelect|\.wait|^sleep) \(")
#: Frames around every sample (start-up, the reactor loop, log context): left out of the inclusive list.
SCAFFOLD = re.compile(
    r"<frozen runpy>|twisted/__main__|twisted/application/|twisted/python/(log|context)\.py|threading\.py"
    r"|ReactorBase\.(run|mainLoop)|\.doPoll |_doReadOrWrite|twisted/scripts/"
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


class Profiler:
    """Runs ``py-spy record`` against ``pid`` (and its subprocesses) for the duration of a ``with`` block."""

    def __init__(self, pid: int, output: Path) -> None:
        self.pid = pid
        self.output = output
        n = 1
        while self.output.exists():  # a measurement taken in rounds keeps every round's samples
            n += 1
            self.output = output.with_name(f"{output.stem}-{n}{output.suffix}")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [spy, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self.output)]
        argv += ["--rate", "250", "--nonblocking", "--idle", "--subprocesses", "--nolineno"]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.output.exists():
            self.output.with_suffix(".txt").write_text(summarize(self.output.read_text()))


def summarize(raw: str, top: int = 20) -> str:
    """Idle share, then the top functions by self and by inclusive samples, from py-spy's collapsed stacks.

    Shares are of the busy samples. Frames around every sample (interpreter start-up, the reactor's run loop)
    say nothing and are left out of the inclusive list.
    """
    own: Counter = Counter()
    inclusive: Counter = Counter()
    busy = idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames or not count.isdigit():
            continue
        n = int(count)
        if IDLE.search(frames[-1]):
            idle += n
            continue
        busy += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not busy:
        return f"{idle} samples, all idle\n"
    lines = [f"{busy + idle} samples (all threads): {busy} busy, {idle} idle (reactor poll, idle pool threads)", ""]
    lines.append("self, share of busy samples:")
    lines += [f"  {n / busy:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive, share of busy samples:"]
    telling = [(frame, n) for frame, n in inclusive.most_common() if not SCAFFOLD.search(frame)]
    lines += [f"  {n / busy:6.1%}  {frame}" for frame, n in telling[: top * 2]]
    return "\n".join(lines) + "\n"
