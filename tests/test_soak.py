"""Soak: 500 concurrent connections for 60 s mixing manifests, cached and cold blobs and bad requests.

The proxy is a real ``twistd dioproxy`` process, the load another process; the upstream is the fake Docker Hub.
Good requests must all succeed; resident memory and open file descriptors must be flat at the end.
``DIOPROXY_SOAK_SECONDS`` shortens the run while developing.
"""

import json
import os
import subprocess
import sys

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.harness import ROOT, ProxyProcess, start_upstream

SECONDS = float(os.environ.get("DIOPROXY_SOAK_SECONDS", "60"))
CONNECTIONS = 500


def rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss * 1024, len(os.listdir(f"/proc/{pid}/fd"))


class SoakTests(unittest.TestCase):
    timeout = SECONDS + 180

    @defer.inlineCallbacks
    def test_soak(self):
        fake = start_upstream(self)
        image = fake.add_image("library/soak", "1.0", layer_sizes=[64 * 1024, 512 * 1024])
        cold = [os.urandom(256 * 1024 + i) for i in range(120)]
        cold_digests = [fake.add_blob(b) for b in cold]
        fake.ratelimit_remaining = fake.ratelimit_limit = 10**9
        cache = os.path.abspath(self.mktemp())
        proxy = ProxyProcess(self, cache, fake.registry_url)
        yield proxy.listening()
        port = proxy.port

        plan = [("GET", "/v2/library/soak/manifests/1.0", 200, len(image.body))] * 4
        plan += [("HEAD", "/v2/library/soak/manifests/1.0", 200, -1)] * 2
        for digest, data in image.blobs.items():
            plan += [("GET", f"/v2/library/soak/blobs/{digest}", 200, len(data))] * 3
        plan += [("GET", f"/v2/library/soak/blobs/{d}", 200, len(b)) for d, b in zip(cold_digests, cold)]
        plan += [
            ("GET", "/v2/UPPER/manifests/1.0", 400, -1),
            ("GET", "/v2/evil.example/x/manifests/1", 404, -1),
            ("PUT", "/v2/library/soak/manifests/1.0", 405, -1),
            ("GET", "/v2/library/soak/blobs/sha256:nothex", 400, -1),
            ("GET", "/v2/library/soak/manifests/missing", 404, -1),
        ]
        plan_file = self.mktemp()
        with open(plan_file, "w") as f:
            f.writelines(f"{m} {p} {s} {n}\n" for m, p, s, n in plan)

        idle = rss_and_fds(proxy.pid)
        load = threads.deferToThread(
            subprocess.run,
            [
                sys.executable,
                os.path.join(ROOT, "tests", "soakload.py"),
                "127.0.0.1",
                str(port),
                plan_file,
                str(CONNECTIONS),
                str(SECONDS),
            ],
            capture_output=True,
            text=True,
            timeout=SECONDS + 120,
        )
        yield task.deferLater(reactor, min(10, SECONDS / 3), lambda: None)
        early = rss_and_fds(proxy.pid)
        peak = early
        while not load.called:
            yield task.deferLater(reactor, 1, lambda: None)
            now = rss_and_fds(proxy.pid)
            peak = (max(peak[0], now[0]), max(peak[1], now[1]))
        result = yield load
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        stats = json.loads(result.stdout)
        yield task.deferLater(reactor, 3, lambda: None)  # connections close, fills end
        end = rss_and_fds(proxy.pid)
        report = (
            f"soak {SECONDS:.0f}s x {CONNECTIONS} connections: {stats['good']} good requests "
            f"({stats['good_failed']} failed), {stats['bad']} bad ones ({stats['bad_failed']} wrongly answered); "
            f"RSS {early[0] >> 20} MB after warm-up, peak {peak[0] >> 20} MB, end {end[0] >> 20} MB; "
            f"fds {idle[1]} idle -> {early[1]} -> peak {peak[1]} -> end {end[1]}"
        )
        print("\n" + report)
        with open(os.path.join(ROOT, "_trial_temp_soak.txt"), "w") as f:
            f.write(report + "\n")
        self.assertGreater(stats["good"], 1000, report)
        self.assertEqual((stats["good_failed"], stats["bad_failed"]), (0, 0), stats["examples"])
        self.assertLess(end[0], early[0] + 40 * 2**20, "resident memory grew: " + report)
        # What may stay open: the upstream connection pool (registry, token service, CDN: 16 each at most).
        self.assertLessEqual(end[1], idle[1] + 3 * 16, "file descriptors leaked: " + report)
        self.assertEqual(fake.count("cdn", "GET", cold_digests[0]), 1, "one upstream fill per cold blob")
