"""Replicas on one Redis and one bucket (``coordination`` + ``storage.s3``) with real clients (issue 11, section 3).

Three real ``twistd dioproxy`` processes, each with its own cache directory, on one ``redis-server`` and one
SeaweedFS bucket, behind nginx going round them (an ``upstream`` block, round robin):

- docker, podman and containerd pull through nginx: the upstream's digests, no blob fetched upstream twice; then
  a fourth replica with an empty disk (same Redis, same bucket) serves those images to a fresh podman with zero
  upstream requests;
- 16 concurrent cold clients of the 24 MiB layer, sent straight to the replicas (6, 5, 5, so every replica has
  clients of its own): one GET in the registry's access log, every body's sha256 right, and on every replica the
  first body byte long before the fill ends;
- redis-server SIGKILLed while podman pulls that layer through nginx, then started again: that pull and the
  pulls during the outage and after it succeed, and afterwards the replicas take leases in Redis again.

In the last two docker.io is the CNCF registry behind an nginx with ``limit_rate``: a fill takes seconds, long
enough to tell a streamed first byte from one sent after the fill, and to kill Redis while a pull is under way.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from tests.redisserver import RedisServer

from .clients import Containerd, Dockerd, Nginx, Podman, Proxy, Skopeo, state_dir
from .procs import remove_tree
from .test_bucket import BucketTestCase, containerd_puller, docker_puller, object_keys, podman_puller, skopeo_puller
from .world import Image

SECRET = "the e2e fleet's shared secret"
#: The slow link in front of the docker.io registry: the 24 MiB layer takes about 3 s through it.
SLOW_LINK = "8m"


class FleetTestCase(BucketTestCase):
    """A fleet per test: its own redis-server, this test's prefix in the shared bucket, replicas started on demand."""

    async def setUp(self) -> None:
        await super().setUp()
        base = state_dir("redis")
        self.addCleanup(deferToThread, remove_tree, base)
        self.redis = RedisServer(str(base))
        self.addCleanup(deferToThread, self.redis.stop)
        await deferToThread(self.redis.start)

    async def replicas(self, names: str, docker_io: str | None = None) -> list[Proxy]:
        """One started replica per letter of ``names``, concurrently; ``docker_io`` replaces the registry's URL."""
        made = []
        for name in names:
            proxy = Proxy(self.world, self.proxy_name("." + name))
            config = {
                "coordination": {"redis": self.redis.url, "secret": SECRET, "advertise": f"http://{proxy.address}"},
                "storage": {"s3": self.store.s3_settings(self.prefix)},
            }
            path = Path(self.mktemp()).absolute()
            path.write_text(yaml.safe_dump(config))
            if docker_io:
                argv = proxy.daemon.argv
                argv[argv.index(f"docker.io={self.world.registries['docker.io'].url}")] = f"docker.io={docker_io}"
            proxy.daemon.argv += ["--config", str(path)]
            made.append(proxy)
        await gatherResults([ensureDeferred(self.start(p)) for p in made], consumeErrors=True)
        return made

    async def slow_link(self) -> str:
        """The docker.io registry behind an nginx that sends each response at :data:`SLOW_LINK` bytes a second."""
        throttle = await self.start(Nginx(self.world.registries["docker.io"].address, limit_rate=SLOW_LINK))
        return f"http://{throttle.address}"


def biggest_blob(world_base: Path, key: str) -> str:
    """The digest of the largest blob of a seeded image (its layout is still on disk)."""
    blobs = (world_base / "layouts" / key / "blobs" / "sha256").iterdir()
    return "sha256:" + max(blobs, key=lambda p: p.stat().st_size).name


def blob_gets(requests: list, digest: str) -> int:
    """Upstream GETs of ``digest`` that sent it (a 401 before the token is the Bearer challenge, not a fetch)."""
    return sum(1 for _, r in requests if r.method == "GET" and digest in r.uri and r.status < 300)


class FleetClientTests(FleetTestCase):
    client = "fleet"

    async def test_clients_pull_through_nginx_and_an_empty_replica_serves_them_alone(self) -> None:
        hello, big, tool = (self.image(k) for k in ("hello", "big", "tool"))
        fleet = await self.replicas("abc")
        nginx = await self.start(Nginx([p.address for p in fleet]))
        docker, ctr = await gatherResults(
            [ensureDeferred(self.start(Dockerd(nginx.address))), ensureDeferred(self.start(Containerd(nginx.address)))],
            consumeErrors=True,
        )
        podman = await self.start(Podman(nginx.address))
        pulls = ((docker_puller(docker), hello), (podman_puller(podman), big), (containerd_puller(ctr), tool))
        for puller, image in pulls:
            self.client = f"{puller.name} (fleet of 3, nginx)"
            self.proxy = fleet[0]  # measure() counts this one's requests; all three are checked below
            cold = await self.measure(image, "cold", lambda puller=puller, image=image: puller.pull(image))
            self.assertGreater(cold.upstream[f"{image.registry} blob"], 0, f"{puller.name}: not through the fleet?")
            await deferToThread(puller.verify, image)
        served = {p.address: len(await deferToThread(p.requests)) for p in fleet}
        self.assertTrue(all(served.values()), f"nginx did not go round the replicas: {served}")
        print(f"\nregistry API requests per replica: {served}")

        images = [hello, big, tool]
        lines = [a for p in fleet for a in await deferToThread(p.access)]
        keys = object_keys(lines, images) | {f"tags/{i.registry}/{i.repository}/{i.tag}" for i in images}
        await deferToThread(self.wait_for_keys, keys)

        (fourth,) = await self.replicas("d")
        self.proxy = fourth
        fresh = podman_puller(await self.start(Podman(fourth.address)))
        mark = await deferToThread(self.world.mark)
        self.client = "podman (4th replica, empty disk)"
        for image in images:
            await self.measure(image, "replica", lambda image=image: fresh.pull(image))
            await deferToThread(fresh.verify, image)
        upstream = await deferToThread(mark.since, 1.0)
        self.assertEqual({k: n for k, n in upstream.items() if n}, {}, "the empty replica asked the upstreams")
        blobs = [a for a in await deferToThread(fourth.access) if a.kind == "blob" and a.method == "GET"]
        self.assertTrue(blobs, "the fourth replica sent no blob")
        self.assertEqual({a.status for a in blobs}, {"200"}, blobs)


class FleetColdBlobTests(FleetTestCase):
    client = "fleet cold blob"

    async def fetch(self, url: str) -> tuple[int, str, int, float, float]:
        """(status, sha256 of the body, its length, seconds to the first body byte, seconds in all)."""
        began = reactor.seconds()
        response = await treq.get(url, unbuffered=True, persistent=False).addTimeout(30, reactor)
        digest, first, length = hashlib.sha256(), [], [0]

        def got(chunk: bytes) -> None:
            first or first.append(reactor.seconds() - began)
            digest.update(chunk)
            length[0] += len(chunk)

        await treq.collect(response, got).addTimeout(60, reactor)
        return response.code, "sha256:" + digest.hexdigest(), length[0], first[0], reactor.seconds() - began

    async def test_sixteen_cold_clients_over_three_replicas_make_one_upstream_get(self) -> None:
        big = self.image("big")
        layer = biggest_blob(self.world.base, "big")
        fleet = await self.replicas("abc", docker_io=await self.slow_link())
        mark = await deferToThread(self.world.mark)
        urls = [f"http://{fleet[i % 3].address}/v2/{big.repository}/blobs/{layer}" for i in range(16)]
        results = await gatherResults([ensureDeferred(self.fetch(u)) for u in urls], consumeErrors=True)
        self.assertEqual({(code, got) for code, got, *_ in results}, {(200, layer)})
        gets = blob_gets(await deferToThread(mark.requests, 1.0), layer)
        self.assertEqual(gets, 1, "upstream GETs of the layer for 16 clients over 3 replicas")
        fill = min(total for *_, total in results)
        for i, proxy in enumerate(fleet):
            mine = results[i::3]
            ttfb, totals = max(r[3] for r in mine), [r[4] for r in mine]
            print(
                f"\nreplica {proxy.address}: {len(mine)} clients of {results[0][2]} bytes, first body byte after "
                f"{ttfb * 1000:.0f} ms at most, done after {min(totals):.2f}-{max(totals):.2f} s"
            )
            self.assertLess(ttfb, fill / 4, f"a client of replica {proxy.address} waited for the fill")
            path = proxy.base / "cache" / "blobs" / "sha256" / layer[7:9] / layer[7:]
            self.assertTrue(path.is_file(), f"replica {proxy.address} did not keep the layer")


class FleetRedisOutageTests(FleetTestCase):
    client = "fleet, Redis killed"

    def filled(self, fleet: list[Proxy], digest: str) -> float:
        """How much of ``digest`` a fill under way on some replica holds (0 to 1), from their status pages."""
        for proxy in fleet:
            request = urllib.request.Request(f"http://{proxy.address}/", headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as response:
                for fill in json.load(response)["fills"]:
                    if fill["digest"] == digest and fill["size"]:
                        return fill["written"] / fill["size"]
        return 0.0

    def rejoined(self, fleet: list[Proxy]) -> None:
        """Waits until every replica that gave up on Redis found it again (it PINGs every few seconds)."""
        down = [p for p in fleet if "fleet calls fail at once" in p.daemon.log_text()]
        self.assertTrue(down, "no replica noticed that Redis was gone")
        for proxy in down:
            proxy.daemon.wait_until(lambda p=proxy: "answers again" in p.daemon.log_text(), 15, "back on Redis")
        print(f"\n{len(down)} of {len(fleet)} replicas noticed the outage; all are back on Redis")

    async def test_pulls_go_on_while_redis_is_killed_and_restarted(self) -> None:
        big, hello, tool, classic = (self.image(k) for k in ("big", "hello", "tool", "classic"))
        layer = biggest_blob(self.world.base, "big")
        fleet = await self.replicas("abc", docker_io=await self.slow_link())
        nginx = await self.start(Nginx([p.address for p in fleet]))
        podman = podman_puller(await self.start(Podman(nginx.address)))
        skopeo = skopeo_puller(await self.start(Skopeo()), nginx)
        self.proxy = fleet[0]
        timings = []

        async def pull(puller, image: Image, phase: str) -> None:
            self.client = f"{puller.name} (fleet, {phase})"
            began = time.monotonic()
            await self.measure(image, phase, lambda: puller.pull(image))
            await deferToThread(puller.verify, image)
            timings.append(f"{puller.name} {image.repository}, {phase}: {time.monotonic() - began:.2f} s")

        under_way = ensureDeferred(pull(podman, big, "Redis killed mid-pull"))

        def mid_fill() -> bool:
            return 0 < self.filled(fleet, layer) < 0.5

        await deferToThread(fleet[0].daemon.wait_until, mid_fill, 30, "filling the layer")
        await deferToThread(self.redis.kill)
        done = await deferToThread(self.filled, fleet, layer)
        self.assertTrue(0 < done < 1, "the layer's fill was not under way when Redis was killed")
        await under_way
        timings.append(f"(Redis was killed with {done:.0%} of the 24 MiB layer filled)")
        await pull(skopeo, hello, "Redis down")

        await deferToThread(self.redis.start)
        self.assertEqual(await deferToThread(self.redis.command, "DBSIZE"), b":0", "Redis came back with data")
        await pull(podman, tool, "Redis just back")
        await deferToThread(self.rejoined, fleet)
        await pull(podman, classic, "Redis back")
        # A lease granted leaves the fleet's fence counter behind: the replicas use the restarted Redis.
        keys = await deferToThread(self.redis.command, "DBSIZE")
        self.assertNotEqual(keys, b":0", "no replica took a lease in the restarted Redis")
        print("\n" + "\n".join(timings))
