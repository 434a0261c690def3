"""The shared tier (``storage.s3``) with real clients: real ``twistd dioproxy`` processes on a real SeaweedFS.

- docker, podman and containerd pull through a mirror with the bucket on; what they pulled reaches the bucket,
  byte-exact; a second mirror with an empty cache directory on the same bucket serves every image to a fresh
  podman with zero upstream requests (counted in the upstream registries' own access logs).
- ``storage.s3.redirect``: once the bucket holds an image, docker, podman, containerd and skopeo get 307s for
  its blobs and read the bytes from the store: the mirror's access log shows 307s with no body sent, SeaweedFS's
  own metrics (``-metricsPort``) show the GETs and the bytes.
- The store stopped during a cold pull: the pull is served from the upstream, and once the store is back the
  running mirror uploads what it lacks.

Each test has its own key prefix in one shared store (the outage test has a store of its own).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from tests import seaweed

from .base import ClientTestCase, assert_digest
from .clients import Access, Containerd, Dockerd, Podman, Proxy, Skopeo, state_dir, verify_oci_layout
from .procs import remove_tree
from .world import Image

#: How long the uploads of a pulled image may take to show in the bucket (a few MB; SeaweedFS writes ~100 MB/s).
UPLOAD_DEADLINE = 60.0


def short(image: Image) -> str:
    """The name docker pulls through ``registry-mirrors``: ``hello:1.0`` for ``docker.io/library/hello:1.0``."""
    return f"{image.repository.removeprefix('library/')}:{image.tag}"


def ref(image: Image) -> str:
    return f"{image.registry}/{image.repository}:{image.tag}"


@dataclass
class Puller:
    """How one real client pulls an image, and checks that what it holds has the upstream's digest."""

    name: str
    pull: Callable[[Image], object]
    verify: Callable[[Image], object]


def docker_puller(docker: Dockerd) -> Puller:
    return Puller(
        "docker",
        lambda image: docker.pull(short(image)),
        lambda image: assert_digest(docker.repo_digests(short(image)), image, short(image).split(":")[0]),
    )


def podman_puller(podman: Podman) -> Puller:
    return Puller(
        "podman",
        lambda image: podman.pull(ref(image)),
        lambda image: assert_digest(podman.repo_digests(ref(image)), image, f"{image.registry}/{image.repository}"),
    )


def containerd_puller(ctr: Containerd) -> Puller:
    def verify(image: Image) -> None:
        if ctr.digest(ref(image)) != image.digest:
            raise AssertionError(f"ctr has {ref(image)} at {ctr.digest(ref(image))}, upstream at {image.digest}")

    return Puller("containerd", lambda image: ctr.pull(ref(image)), verify)


def skopeo_puller(skopeo: Skopeo, mirror: Proxy) -> Puller:
    """``skopeo copy --all`` into a fresh OCI layout: every blob of every platform, each sha256 checked."""
    copies: list[Path] = []

    def verify(image: Image) -> None:
        digest, blobs = verify_oci_layout(copies[-1])
        if (digest, blobs) != (image.digest, set(image.blobs)):
            raise AssertionError(f"skopeo copied {digest} with blobs {sorted(blobs ^ set(image.blobs))} differing")

    return Puller(
        "skopeo", lambda image: copies.append(skopeo.copy(f"{mirror.address}/{image.repository}:{image.tag}")), verify
    )


class BucketTestCase(ClientTestCase):
    """Mirrors on a SeaweedFS bucket, under a key prefix of this test's own."""

    #: Set by a test that needs its own store (one it stops); else the store shared by the module.
    store: seaweed.SeaweedFS

    async def setUp(self) -> None:
        await self.start_world()
        if not hasattr(self, "store"):
            self.store = await seaweed.shared("e2e-bucket")
        self.prefix = f"e2e/{self._testMethodName}/{time.time_ns()}/"
        self.s3 = self.store.client(timeout=10)

    async def mirror(self, name: str, **s3: object) -> Proxy:
        """A real ``twistd dioproxy`` with an empty cache directory and ``storage.s3`` on this test's prefix."""
        config = {"storage": {"s3": self.store.s3_settings(self.prefix, **s3)}}
        path = Path(self.mktemp()).absolute()
        path.write_text(yaml.safe_dump(config))
        proxy = Proxy(self.world, self.proxy_name("." + name))
        proxy.daemon.argv += ["--config", str(path)]
        return await self.start(proxy)

    # -- the bucket, read behind the mirrors' backs (blocking: call through deferToThread) ---------------------

    def listing(self) -> dict[str, int]:
        """Key (under this test's prefix) -> size of every object in the bucket."""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.store.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix) :]] = item["Size"]
        return found

    def wait_for_keys(self, keys: set[str], deadline: float = UPLOAD_DEADLINE) -> dict[str, int]:
        """The listing once it holds every key of ``keys``; fails naming the missing ones after ``deadline``."""
        end = time.monotonic() + deadline
        while True:
            listing = self.listing()
            missing = keys - listing.keys()
            if not missing:
                return listing
            if time.monotonic() > end:
                raise AssertionError(f"not in the bucket after {deadline:g} s: {sorted(missing)}")
            time.sleep(0.2)

    def assert_objects_intact(self, keys: set[str]) -> None:
        """Every blob object's sha256 is its key; every manifest object is its media type, a newline, bytes whose
        sha256 is its key."""
        for key in keys:
            body = self.s3.get_object(Bucket=self.store.bucket, Key=self.prefix + key)["Body"].read()
            if key.startswith("manifests/"):
                body = body.partition(b"\n")[2]
            if hashlib.sha256(body).hexdigest() != key.rsplit("/", 1)[1]:
                raise AssertionError(f"{key} in the bucket does not match its digest")


def object_keys(lines: list[Access], images: list[Image]) -> set[str]:
    """The bucket keys of what the clients got through a mirror: every blob and manifest digest they fetched
    (from its access log), and the digest each pulled tag named."""
    keys = set()
    for line in lines:
        if line.method == "GET" and line.status in ("200", "206") and line.digest:
            kind = "blobs" if line.kind == "blob" else "manifests"
            keys.add(f"{kind}/sha256/{line.digest[7:9]}/{line.digest[7:]}")
    for image in images:
        keys.add(f"manifests/sha256/{image.digest[7:9]}/{image.digest[7:]}")
    return keys


class SharedTierTests(BucketTestCase):
    client = "bucket"

    async def test_clients_fill_the_bucket_and_an_empty_replica_serves_it_alone(self) -> None:
        """docker (hello, classic), podman (big) and containerd (ghcr.io tool) pull cold images through mirror A;
        every blob and manifest they got lands in the bucket, intact, with the tag entries. Mirror B, its cache
        directory empty, then serves all four images to a fresh podman: the upstreams see no request at all."""
        hello, classic, big, tool = (self.image(k) for k in ("hello", "classic", "big", "tool"))
        self.proxy = first = await self.mirror("a")
        docker, ctr = await gatherResults(
            [ensureDeferred(self.start(Dockerd(first.address))), ensureDeferred(self.start(Containerd(first.address)))],
            consumeErrors=True,
        )
        podman = await self.start(Podman(first.address))
        pulls = [
            (docker_puller(docker), hello),
            (docker_puller(docker), classic),
            (podman_puller(podman), big),
            (containerd_puller(ctr), tool),
        ]
        for puller, image in pulls:
            self.client = f"{puller.name} (bucket, cold)"
            cold = await self.measure(image, "cold", lambda puller=puller, image=image: puller.pull(image))
            self.assertGreater(cold.upstream[f"{image.registry} blob"], 0, f"{puller.name}: not through the mirror?")
            await deferToThread(puller.verify, image)

        keys = object_keys(await deferToThread(first.access), [hello, classic, big, tool])
        keys |= {f"tags/{i.registry}/{i.repository}/{i.tag}" for i in (hello, classic, big, tool)}
        listing = await deferToThread(self.wait_for_keys, keys)
        self.assertGreaterEqual(max(listing.values()), 24 * 2**20, "the big layer is not in the bucket")
        await deferToThread(self.assert_objects_intact, {k for k in keys if not k.startswith("tags/")})

        # Mirror B: an empty cache directory, the same bucket; a podman that has never pulled anything.
        self.proxy = second = await self.mirror("b")
        fresh = podman_puller(await self.start(Podman(second.address)))
        mark = await deferToThread(self.world.mark)
        self.client = "podman (empty replica)"
        for image in (hello, classic, big, tool):
            await self.measure(image, "replica", lambda image=image: fresh.pull(image))
            await deferToThread(fresh.verify, image)
        upstream = await deferToThread(mark.since, 1.0)
        self.assertEqual(
            {k: n for k, n in upstream.items() if n}, {}, "the empty replica asked the upstreams (or their tokens)"
        )
        served = [a for a in await deferToThread(second.access) if a.kind == "blob" and a.method == "GET"]
        self.assertEqual({a.status for a in served}, {"200"}, served)
        # What B read from the bucket went into its hot tier as it passed.
        cache = second.base / "cache" / "blobs" / "sha256"
        missing = {a.digest for a in served if a.digest and not (cache / a.digest[7:9] / a.digest[7:]).is_file()}
        self.assertEqual(missing, set(), "blobs replica B served but did not keep")


class RedirectTests(BucketTestCase):
    client = "bucket redirect"

    async def test_clients_read_blobs_from_the_store(self) -> None:
        """``redirect: true``. skopeo warms hello and big (every platform) through the mirror: those blobs are
        cold, so the mirror sends them itself. Once the bucket lists them, fresh docker, podman, containerd and
        skopeo clients pull: each blob GET is a 307 with no body from the mirror, and the store counts the GETs
        and the bytes."""
        hello, big = self.image("hello"), self.image("big")
        self.proxy = mirror = await self.mirror("redirect", redirect=True, redirect_ttl="1m")
        warm = skopeo_puller(await self.start(Skopeo()), mirror)
        for image in (hello, big):
            await deferToThread(warm.pull, image)
            await deferToThread(warm.verify, image)
        cold = [a for a in await deferToThread(mirror.access) if a.kind == "blob" and a.method == "GET"]
        self.assertTrue(cold)
        self.assertEqual({a.status for a in cold}, {"200"}, "a blob not uploaded yet must be sent by the mirror")
        self.assertGreaterEqual(sum(a.sent for a in cold), 24 * 2**20)
        keys = {k for k in object_keys(cold, []) if k.startswith("blobs/")}
        listing = await deferToThread(self.wait_for_keys, keys)

        docker, ctr = await gatherResults(
            [
                ensureDeferred(self.start(Dockerd(mirror.address))),
                ensureDeferred(self.start(Containerd(mirror.address))),
            ],
            consumeErrors=True,
        )
        podman, skopeo = await self.start(Podman(mirror.address)), await self.start(Skopeo())
        pulls = [
            (docker_puller(docker), hello),
            (podman_puller(podman), big),
            (containerd_puller(ctr), big),
            (skopeo_puller(skopeo, mirror), hello),
        ]
        for puller, image in pulls:
            client = puller.name
            self.client = f"{client} (redirect)"
            before = len(await deferToThread(mirror.access))
            gets = await deferToThread(self.store.metric, "SeaweedFS_s3_request_total", type="GET", code="200")
            sent = await deferToThread(self.store.metric, "SeaweedFS_s3_bucket_traffic_sent_bytes_total")
            pulled = await self.measure(image, "redirect", lambda puller=puller, image=image: puller.pull(image))
            await deferToThread(puller.verify, image)
            self.assertEqual(pulled.upstream[f"{image.registry} blob"], 0, f"{client}: blobs fetched upstream")
            lines = [a for a in (await deferToThread(mirror.access))[before:] if a.kind == "blob" and a.method == "GET"]
            self.assertTrue(lines, f"{client} fetched no blob through the mirror")
            self.assertEqual({(a.status, a.sent) for a in lines}, {("307", 0)}, f"{client}: blob bytes from the mirror")
            redirected = {f"blobs/sha256/{a.digest[7:9]}/{a.digest[7:]}" for a in lines}
            store_gets = await deferToThread(self.store.metric, "SeaweedFS_s3_request_total", type="GET", code="200")
            store_sent = await deferToThread(self.store.metric, "SeaweedFS_s3_bucket_traffic_sent_bytes_total")
            self.assertGreaterEqual(store_gets - gets, len(redirected), f"{client}: the store saw too few GETs")
            expected = sum(listing[k] for k in redirected)
            self.assertGreaterEqual(store_sent - sent, expected, f"{client}: the store sent too few bytes")
            print(
                f"\n{client}: {len(lines)} blob GETs answered 307 (0 bytes from the mirror); the store answered "
                f"{store_gets - gets:.0f} GETs, {store_sent - sent:.0f} bytes (the blobs: {expected} bytes)"
            )


class StoreOutageTests(BucketTestCase):
    client = "bucket outage"

    async def setUp(self) -> None:
        # Under /tmp: weed's unix socket path must stay short.
        base = state_dir("seaweed")
        self.addCleanup(deferToThread, remove_tree, base)
        self.store = seaweed.SeaweedFS(str(base))
        self.addCleanup(deferToThread, self.store.stop)
        await deferToThread(self.store.start)
        await super().setUp()

    async def test_cold_pull_while_the_store_is_stopped(self) -> None:
        """The store stops after the mirror started; podman pulls big (cold): the upstream serves it, the
        uploads fail; the store starts again and the same mirror process uploads every blob and manifest."""
        big = self.image("big")
        self.proxy = mirror = await self.mirror("outage")
        pid = mirror.daemon.process.pid
        podman = podman_puller(await self.start(Podman(mirror.address)))
        await deferToThread(self.store.stop)
        cold = await self.measure(big, "store down", lambda: podman.pull(big))
        await deferToThread(podman.verify, big)
        self.assertGreater(cold.upstream["docker.io blob"], 0)
        keys = object_keys(await deferToThread(mirror.access), [big]) | {f"tags/docker.io/{big.repository}/{big.tag}"}
        await deferToThread(
            mirror.daemon.wait_until,
            lambda: "to the object store failed" in mirror.daemon.log_text(),
            10,
            "trying an upload while the store is down",
        )

        await deferToThread(self.store.start)
        started = time.monotonic()
        await deferToThread(self.wait_for_keys, keys)
        print(f"\n{len(keys)} objects uploaded {time.monotonic() - started:.1f} s after the store came back")
        await deferToThread(self.assert_objects_intact, {k for k in keys if not k.startswith("tags/")})
        self.assertTrue(mirror.daemon.running and mirror.daemon.process.pid == pid, "the mirror was restarted")
