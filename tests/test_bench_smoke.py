"""The benchmark cannot rot: ``python -m bench --quick`` runs every scenario end to end with tiny sizes.

It is a subprocess (the bench starts and kills servers, installs a SIGTERM handler and prints a table), driven by
``getProcessOutputAndValue`` so trial's reactor keeps turning. Its report goes to a temporary ``--out`` directory:
the smoke run must never overwrite the measured ``docs/performance.md``. The numbers of a quick run mean nothing,
so no target is checked here; what is checked is that every scenario produced numbers for every server, not errors.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from twisted.internet import utils
from twisted.trial import unittest

REPOSITORY = Path(__file__).resolve().parents[1]

#: One pattern per table row the bench must print (scenario number, then the start of its title).
ROWS = [
    r"\| 1 \| cached tag manifest",
    r"\| 2 \| warm \d+ MB blob, 1 stream",
    r"\| 2 \| warm \d+ MB blob, 8 streams",
    r"\| 3 \| cold \d+ MB blob, 1 client: first body byte",
    r"\| 3 \| cold \d+ MB blob, 1 client: total",
    r"\| 3 \| cold blob, 1 client: upstream blob GETs",
    r"\| 3 \| cold \d+ MB blob, 16 clients: total",
    r"\| 3 \| cold blob, 16 clients: upstream blob GETs",
    r"\| 4 \| 32 readers at 4 MB/s",
    r"\| 4 \| during scenario 3: peak RSS",
    r"\| 5 \| skopeo copy of a \d+ MiB image, cold",
    r"\| 5 \| skopeo copy of a \d+ MiB image, warm",
]


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


class BenchSmokeTests(unittest.TestCase):
    timeout = 240

    async def test_quick_run_prints_every_scenario(self) -> None:
        out = Path(tempfile.mkdtemp(prefix="dioproxy-bench-smoke-"))
        self.addCleanup(shutil.rmtree, out, True)
        docs = REPOSITORY / "docs" / "performance.md"
        before = docs.read_bytes() if docs.exists() else None
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
        }
        stdout, stderr, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "bench", "--quick", "--out", str(out)], env=env, path=str(REPOSITORY)
        )
        text, log = stdout.decode(), stderr.decode()
        self.assertEqual(code, 0, f"python -m bench --quick exited {code}\n--- stderr\n{log[-4000:]}")
        for pattern in ROWS:
            self.assertRegex(text, pattern, f"row missing from the table:\n{text}")
        rows = [line for line in text.splitlines() if re.match(r"\| \d \|", line)]
        self.assertEqual(len(rows), len(ROWS), text)
        errors = [line for line in rows if "error:" in line]
        self.assertEqual(errors, [], f"measurements failed:\n{chr(10).join(errors)}\n--- stderr\n{log[-4000:]}")
        report = (out / "performance.md").read_text()
        self.assertIn("<!-- bench:begin -->", report)
        self.assertIn("| 1 | cached tag manifest", report)
        if _has_matplotlib():
            self.assertGreater((out / "img" / "performance.png").stat().st_size, 1000)
        else:  # `pip install .[bench]` brings it; without it the bench says so instead of drawing
            self.assertIn("(no chart: ", report)
        self.assertEqual(docs.read_bytes() if docs.exists() else None, before, "the smoke run touched docs/")
