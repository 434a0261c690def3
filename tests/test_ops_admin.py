"""The ``dioproxy`` admin command: prefetch through a running proxy, ls, stats, verify [--repair], purge,
client-config. Commands that talk HTTP block, so they run in a thread while the reactor serves the proxy."""

from __future__ import annotations

import io
import json
import os

from twisted.internet import defer, threads
from twisted.trial import unittest

from dioproxy import admin, snippets
from tests.harness import Proxy, start_upstream
from tests.test_ops_metrics import Puller


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = admin.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def run_in_thread(*argv: str) -> defer.Deferred:
    return threads.deferToThread(run, *argv)


class ParseTests(unittest.TestCase):
    def test_image_references(self):
        cases = {
            "alpine": ("docker.io", "library/alpine", "latest"),
            "alpine:3.19": ("docker.io", "library/alpine", "3.19"),
            "bitnami/redis:7": ("docker.io", "bitnami/redis", "7"),
            "ghcr.io/owner/img": ("ghcr.io", "owner/img", "latest"),
            "localhost:5000/a/b:t": ("localhost:5000", "a/b", "t"),
            "quay.io/x/y@sha256:" + "a" * 64: ("quay.io", "x/y", "sha256:" + "a" * 64),
        }
        for text, (registry, name, reference) in cases.items():
            image = admin.parse_image(text)
            self.assertEqual((image.registry, image.name, image.reference), (registry, name, reference), text)
        for bad in ("UPPER/case", "a/../b", "x:bad tag", "a@sha256:short"):
            self.assertRaises(admin.AdminError, admin.parse_image, bad)


class CacheCommandTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self)
        self.proxy = Proxy(self, self.fake.registry_url)
        self.root = self.proxy.cache_dir
        yield self.proxy.mirror.cache.when_ready()
        self.multi = self.fake.add_image(
            "library/multi", "1", layer_sizes=[50_000, 120_000], platforms=["linux/amd64", "linux/arm64/v8"]
        )

    @defer.inlineCallbacks
    def test_prefetch_all_platforms_then_ls_and_stats(self):
        code, out, err = yield run_in_thread("prefetch", "multi:1", "--proxy", self.proxy.url, "-j", "3")
        self.assertEqual(code, 0, err)
        self.assertIn("docker.io/library/multi:1", out)
        self.assertIn("2 platform(s): linux/amd64, linux/arm64/v8", out)
        for digest in self.multi.blobs:
            self.assertTrue(os.path.exists(self.proxy.blob_file(digest)), digest)
        self.assertIn("[6/6]", err)  # progress: a line per blob when not on a terminal

        # Everything is cached now: a second prefetch does not reach the upstream's CDN.
        self.fake.clear_requests()
        code, _, _ = yield run_in_thread("prefetch", "docker.io/library/multi:1", "--proxy", self.proxy.url, "-q")
        self.assertEqual((code, self.fake.count("cdn")), (0, 0))

        code, out, _ = yield run_in_thread("ls", "--cache-dir", self.root, "--json")
        self.assertEqual(code, 0)
        (row,) = json.loads(out)
        blob_bytes = sum(len(b) for b in self.multi.blobs.values())
        self.assertEqual((row["registry"], row["repository"], row["tag"]), ("docker.io", "library/multi", "1"))
        self.assertEqual(row["digest"], self.multi.digest)
        self.assertEqual((row["blobs_cached"], row["blobs"]), (6, 6))
        self.assertEqual(row["platforms"], ["linux/amd64", "linux/arm64/v8"])
        self.assertGreater(row["size"], blob_bytes)  # plus three manifests
        self.assertIsNotNone(row["last_use"])
        code, out, _ = yield run_in_thread("ls", "--cache-dir", self.root)
        self.assertIn("docker.io/library/multi:1", out)

        code, out, _ = yield run_in_thread("stats", "--cache-dir", self.root, "--proxy", self.proxy.url)
        self.assertEqual(code, 0)
        self.assertIn("blobs                    6", out)
        self.assertIn("manifests                3", out)
        self.assertIn("hit ratio", out)

    @defer.inlineCallbacks
    def test_prefetch_chosen_platform_and_errors(self):
        code, _out, err = yield run_in_thread(
            "prefetch", "multi:1", "--platform", "linux/arm64", "--proxy", self.proxy.url
        )
        self.assertEqual(code, 0, err)
        arm = self.multi.platform("linux/arm64/v8")
        amd = self.multi.platform("linux/amd64")
        for digest in [arm.config_digest, *arm.layer_digests]:
            self.assertTrue(os.path.exists(self.proxy.blob_file(digest)))
        for digest in [amd.config_digest, *amd.layer_digests]:
            self.assertFalse(os.path.exists(self.proxy.blob_file(digest)))
        code, _, err = yield run_in_thread(
            "prefetch", "multi:1", "--platform", "windows/amd64", "--proxy", self.proxy.url
        )
        self.assertEqual(code, 1)
        self.assertIn("no manifest for windows/amd64 (has: linux/amd64, linux/arm64/v8)", err)
        code, _, err = yield run_in_thread("prefetch", "nothing:here", "--proxy", self.proxy.url)
        self.assertEqual(code, 1)
        self.assertIn("HTTP 404", err)
        code, _, err = yield run_in_thread("prefetch", "x", "--proxy", "http://127.0.0.1:1")
        self.assertEqual(code, 1)

    @defer.inlineCallbacks
    def test_verify_and_repair(self):
        yield Puller(self, self.proxy).pull(self.fake.add_image("library/single", "1", layer_sizes=[80_000]))
        code, out, _ = yield run_in_thread("verify", "--cache-dir", self.root)
        self.assertEqual(code, 0, out)
        self.assertIn("0 damaged", out)

        layer = self.fake.find("cdn")[-1].path.rsplit("/", 1)[-1]
        path = self.proxy.blob_file(layer)
        with open(path, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        manifest = os.path.join(
            self.root, "manifests", "sha256", os.listdir(os.path.join(self.root, "manifests", "sha256"))[0]
        )
        with open(manifest, "ab") as f:
            f.write(b" ")
        tag_dir = os.path.join(self.root, "repos", "docker.io", "library", "single", "_tags")
        with open(os.path.join(tag_dir, "broken"), "w") as f:
            f.write("{not json")

        code, out, _ = yield run_in_thread("verify", "--cache-dir", self.root)
        self.assertEqual(code, 1)
        self.assertEqual(out.count("DAMAGED"), 3, out)
        self.assertIn(f"blob {layer}: content has digest", out)
        self.assertIn("tag docker.io/library/single:broken: unreadable entry", out)
        self.assertTrue(os.path.exists(path), "verify without --repair removed something")

        code, out, _ = yield run_in_thread("verify", "--repair", "--cache-dir", self.root)
        self.assertEqual(code, 0)
        self.assertEqual(out.count("removed "), 3, out)
        self.assertFalse(os.path.exists(path))
        code, out, _ = yield run_in_thread("verify", "--cache-dir", self.root)
        self.assertEqual(code, 0, out)

        # The proxy fetches the removed blob again, verified.
        response = yield self.proxy.get(f"/v2/library/single/blobs/{layer}")
        body = yield response.content()
        self.assertEqual(body, self.fake._blobs[layer])
        self.assertTrue(os.path.exists(path))

    @defer.inlineCallbacks
    def test_purge_an_image_keeps_shared_blobs(self):
        shared = os.urandom(30_000)
        a = self.fake.add_image("library/a", "1", layers=[shared, os.urandom(20_000)])
        b = self.fake.add_image("library/b", "1", layers=[shared, os.urandom(20_000)])
        puller = Puller(self, self.proxy)
        yield puller.pull(a)
        yield puller.pull(b)
        code, out, _ = yield run_in_thread("purge", "a", "--cache-dir", self.root, "--dry-run")
        self.assertIn("would remove tag docker.io/library/a:1", out)
        self.assertTrue(all(os.path.exists(self.proxy.blob_file(d)) for d in a.blobs))
        code, out, _ = yield run_in_thread("purge", "a", "--cache-dir", self.root)
        self.assertEqual(code, 0)
        self.assertIn("removed tag docker.io/library/a:1", out)
        self.assertIn("removed 3 entries", out)  # a's manifest, config and own layer
        unique = a.layer_digests[1]
        self.assertFalse(os.path.exists(self.proxy.blob_file(unique)))
        self.assertFalse(os.path.exists(self.proxy.blob_file(a.manifests[0].config_digest)))
        for digest in b.blobs:
            self.assertTrue(os.path.exists(self.proxy.blob_file(digest)), "a blob of b went")
        code, out, _ = yield run_in_thread("ls", "--cache-dir", self.root, "--json")
        self.assertEqual([r["repository"] for r in json.loads(out)], ["library/b"])

    @defer.inlineCallbacks
    def test_purge_older_than(self):
        old = self.fake.add_image("library/old", "1", layer_sizes=[10_000])
        new = self.fake.add_image("library/new", "1", layer_sizes=[10_000])
        puller = Puller(self, self.proxy)
        yield puller.pull(old)
        yield puller.pull(new)
        cache = self.proxy.mirror.cache
        yield cache.flush()
        long_ago = 1_000_000_000
        aged = [("blob", d) for d in old.blobs] + [("manifest", old.digest)]
        for kind, digest in aged:
            os.utime(
                self.proxy.blob_file(digest)
                if kind == "blob"
                else os.path.join(self.root, "manifests", "sha256", digest.split(":")[1]),
                (long_ago, long_ago),
            )

        def age(index):  # in the index too: as if last used long ago
            for key in aged:
                index.add(key, index.get(key)[0], long_ago)

        yield cache.pools.index.run(age, cache.index)
        code, out, _ = yield run_in_thread("purge", "--older-than", "30d", "--cache-dir", self.root)
        self.assertEqual(code, 0, out)
        self.assertIn("removed tag docker.io/library/old:1", out)
        self.assertTrue(all(not os.path.exists(self.proxy.blob_file(d)) for d in old.blobs))
        self.assertTrue(all(os.path.exists(self.proxy.blob_file(d)) for d in new.blobs))

    def test_not_a_cache_directory(self):
        code, _, err = run("ls", "--cache-dir", self.mktemp())
        self.assertEqual(code, 2)
        self.assertIn("is not a dioproxy cache directory", err)
        code, _, err = run("purge", "--cache-dir", self.root)
        self.assertEqual(code, 2)
        self.assertIn("purge what?", err)


class ReadAsItIsTests(unittest.TestCase):
    def test_cache_commands_create_nothing(self):
        """ls, stats, verify and a dry-run purge read a cache directory as it is: no subdirectory appears (the
        store they go through would make its layout's directories otherwise)."""
        root = self.mktemp()
        os.makedirs(os.path.join(root, "repos"))
        for argv in (["ls"], ["stats"], ["verify"], ["purge", "--older-than", "1d", "--dry-run"]):
            code, _, err = run(*argv, "--cache-dir", root)
            self.assertEqual((code, err), (0, ""), argv)
            self.assertEqual(os.listdir(root), ["repos"], argv)


class ClientConfigTests(unittest.TestCase):
    def test_docker(self):
        code, out, _ = run("client-config", "--docker", "--address", "mirror.lan:8004")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["registry-mirrors"], ["http://mirror.lan:8004"])

    def test_each_kind_is_the_shared_template(self):
        address = "mirror.lan:8004"
        _, out, _ = run("client-config", "--podman", "--address", address)
        self.assertEqual(out, snippets.podman_registries_conf(address, ["ghcr.io"]))
        _, out, _ = run("client-config", "--containerd", "--address", address, "--registry", "quay.io")
        self.assertIn("# ==> /etc/containerd/certs.d/quay.io/hosts.toml\n", out)
        self.assertIn(snippets.containerd_hosts_toml(address, "quay.io"), out)
        self.assertIn(snippets.containerd_hosts_toml(address, None), out)
        _, out, _ = run("client-config", "--nginx", "--address", address, "--server-name", "registry.lan")
        self.assertEqual(out, snippets.nginx_site_conf("80", "registry.lan", "127.0.0.1:8004"))
        _, out, _ = run("client-config", "--systemd", "--address", address, "--twistd", "/opt/d/bin/twistd")
        argv = snippets.proxy_argv(
            ["/opt/d/bin/twistd"], 8004, "0.0.0.0", "/var/cache/dioproxy", config="/etc/dioproxy/config.yaml"
        )
        self.assertEqual(out, snippets.systemd_unit(argv))
        _, out, _ = run("client-config", "--all", "--address", address)
        self.assertEqual(out.count("# ==> "), 7)

    def test_bad_address(self):
        code, _, err = run("client-config", "--docker", "--address", "no-port")
        self.assertEqual(code, 2)
        self.assertIn("HOST:PORT", err)
