"""The benchmark cannot rot: ``python -m bench --quick`` runs every scenario end to end with tiny sizes.

It is a subprocess (the bench starts and kills servers, installs a SIGTERM handler and prints a table), driven by
``getProcessOutputAndValue`` so trial's reactor keeps turning. Its report goes to a temporary ``--out`` directory:
the smoke run must never overwrite the measured ``docs/performance.md``. The numbers of a quick run mean nothing,
so no target is checked here; what is checked is that every scenario produced numbers for every server, not errors.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from twisted.internet import reactor, threads, utils
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

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
    # The shared tier (issue 10) on a real SeaweedFS: an error cell here also means the reader's bytes came from
    # the upstream rather than the bucket, or the redirect mirror answered without a redirect.
    r"\| 6 \| shared tier: warm \d+ MB blob from the hot tier",
    r"\| 6 \| shared tier: \d+ MB blob streamed from the bucket",
    r"\| 6 \| shared tier: \d+ MB blob by redirect, curl -L",
    r"\| 6 \| shared tier: upload of a \d+ MB blob to the bucket",
    r"\| 6 \| shared tier: peak RSS of each mirror",
    # --workers 2 against one worker (issue 11): an error cell in a cold row also means a file that is not the blob,
    # or a blob the upstream sent other than once for the 16 clients (the single fill across workers broke).
    r"\| 7 \| --workers 2: cached tag manifest",
    r"\| 7 \| --workers 2: warm \d+ MB blob, 8 streams",
    r"\| 7 \| cold \d+ MB blob, 1 curl writing to disk: total",
    r"\| 7 \| cold \d+ MB blob, 16 curls writing to disk, 1 worker: total",
    r"\| 7 \| cold \d+ MB blob, 16 curls writing to disk, --workers 2: total",
    # Three replicas on one Redis and one bucket (issue 11), the CNCF proxy on shared storage beside them: an error
    # cell in dioproxy's column also means a file that is not the blob, or a blob the upstream sent other than once.
    r"\| 8 \| fleet of 3: cold \d+ MB blob, 1 curl writing to disk: total",
    r"\| 8 \| fleet of 3: cold \d+ MB blob, 16 curls over 3 replicas",
    r"\| 8 \| fleet of 3: cold \d+ MB blob, 16 curls on 1 replica: total",
    r"\| 8 \| fleet of 3: cold blob, 16 curls over the instances: upstream blob GETs",
]


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
        # The chart is part of the report: matplotlib is in the test extras, so a missing chart is a failure.
        self.assertNotIn("(no chart: ", report, "the bench drew no chart")
        self.assertGreater((out / "img" / "performance.png").stat().st_size, 1000)
        self.assertEqual(docs.read_bytes() if docs.exists() else None, before, "the smoke run touched docs/")


class _FirstByteThenPause(Resource):
    """One body byte at once, the rest only after ``pause`` seconds."""

    isLeaf = True

    def __init__(self, body: bytes, pause: float) -> None:
        super().__init__()
        self.body, self.pause = body, pause

    def render_GET(self, request):
        request.setHeader("Content-Length", str(len(self.body)))
        request.write(self.body[:1])
        call = reactor.callLater(self.pause, self._rest, request)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET

    def _rest(self, request):
        request.write(self.body[1:])
        request.finish()


class FetchTimingTests(unittest.TestCase):
    async def test_ttfb_is_the_first_body_byte(self) -> None:
        """bench.fetch promises the first byte of the body, not the first buffer of 1 MiB."""
        from bench.fetch import download

        body, pause = os.urandom(2 << 20), 3.0
        port = reactor.listenTCP(0, Site(_FirstByteThenPause(body, pause)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/blob"
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        result = await threads.deferToThread(download, url, threading.Barrier(1), digest)
        print(f"\nfirst body byte after {result['ttfb'] * 1000:.1f} ms, whole body after {result['total']:.2f} s")
        self.assertEqual((result["status"], result["bytes"], result["digest_ok"]), (200, len(body), True))
        self.assertLess(result["ttfb"], pause / 2)
        self.assertGreaterEqual(result["total"], pause * 0.9)


class WorkersRowTests(unittest.TestCase):
    """Scenario 7's verdicts that no timing decides."""

    def test_a_failed_round_fails_the_row(self) -> None:
        """A round with a wrong upstream GET count is not outvoted by the rounds that got 1."""
        from bench.workers import _strict

        self.assertEqual(_strict([2.0, "2 upstream GETs sent the blob for 16 clients, not 1", 3.0])[:2], "2 ")
        self.assertEqual(_strict([2.0, 4.0, 3.0]), 3.0)

    def test_a_file_that_is_not_the_blob_is_an_error(self) -> None:
        from bench.upstream import BlobFile
        from bench.workers import _same_file

        directory = Path(self.mktemp())
        directory.mkdir()
        body = os.urandom(100_000)
        blob = BlobFile(directory / "blob", "sha256:" + hashlib.sha256(body).hexdigest(), len(body))
        (directory / "good").write_bytes(body)
        (directory / "short").write_bytes(body[:-1])
        _same_file(directory / "good", blob)
        with self.assertRaisesRegex(RuntimeError, "99999 bytes that are not the blob"):
            _same_file(directory / "short", blob)


class _Path(Resource):
    """Answers each GET with its own path."""

    isLeaf = True

    def render_GET(self, request):
        return request.path


class CurlSpreadTests(unittest.TestCase):
    async def test_a_crowd_takes_the_urls_in_turn(self) -> None:
        """Scenario 8's 16 curls "over 3 replicas" reach all three: stream ``i`` asks the ``i % 3``-th URL."""
        from bench.clients import curl_streams

        port = reactor.listenTCP(0, Site(_Path()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        into = Path(self.mktemp())
        into.mkdir()
        _, total, _ = await threads.deferToThread(curl_streams, [f"{base}/a", f"{base}/b", f"{base}/c"], 7, into=into)
        self.assertEqual(total, 7 * 2)
        got = [(into / f"stream-{i}").read_bytes() for i in range(7)]
        self.assertEqual(got, [b"/a", b"/b", b"/c", b"/a", b"/b", b"/c", b"/a"])
