"""``dioproxy ls / stats / verify / purge`` against the shared tier, with a real SeaweedFS (tests/seaweed.py): the
bucket's images beside the local ones, its objects per kind, every object through sha256 (a flipped byte found,
removed by --repair, nothing good removed), and a purge that leaves what any other tag still refers to."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import yaml
from twisted.internet import defer, threads

from dioproxy.config import S3Storage
from dioproxy.objectstore import blob_key, manifest_key
from dioproxy.storage.bucket import tag_key
from dioproxy.storage.bucketscan import BucketScan
from tests.seaweed import free_ports
from tests.test_ops_admin import run_in_thread
from tests.test_tier import MB, _TierTest


class _AdminTest(_TierTest):
    timeout = 120

    def config_file(self, cache_dir: str, **s3: str) -> str:
        """A configuration for the admin command: this cache directory and the test's bucket prefix."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            yaml.safe_dump({"cache": {"dir": cache_dir}, "storage": {"s3": self.s3_config(**s3)}}, f)
        return path

    def keys(self, under: str = "") -> defer.Deferred:
        """Every key under the test's prefix (relative), read behind the command's back."""

        def list_keys():
            found, token = set(), None
            while True:
                params = {"Bucket": self.sw.bucket, "Prefix": self.prefix + under}
                if token:
                    params["ContinuationToken"] = token
                answer = self.s3.list_objects_v2(**params)
                found |= {o["Key"][len(self.prefix) :] for o in answer.get("Contents", ())}
                token = answer.get("NextContinuationToken")
                if not token:
                    return found

        return threads.deferToThread(list_keys)

    def put(self, key: str, data: bytes) -> defer.Deferred:
        return threads.deferToThread(self.s3.put_object, Bucket=self.sw.bucket, Key=self.prefix + key, Body=data)

    @defer.inlineCallbacks
    def shared_image(self, mirror, repo, tag, **kwargs):
        image = self.fake.add_image(repo, tag, **kwargs)
        yield self.pull(mirror, repo, image)
        yield mirror.mirror.bucket.idle()
        return image


class ListAndStatsTests(_AdminTest):
    @defer.inlineCallbacks
    def test_ls_marks_which_tier_holds_each_image(self):
        first = self.mirror()
        both = yield self.shared_image(first, "library/both", "1", layer_sizes=[100_000, 20_000])
        local = yield self.shared_image(first, "library/local", "1", layer_sizes=[30_000])
        yield threads.deferToThread(
            self.s3.delete_object, Bucket=self.sw.bucket, Key=self.prefix + tag_key("docker.io", "library/local", "1")
        )
        other = self.mirror()  # another replica: its image is in the bucket, not in the first one's directory
        remote = yield self.shared_image(other, "library/remote", "2", platforms=["linux/amd64", "linux/arm64"])
        config = self.config_file(first.cache_dir)

        code, out, err = yield run_in_thread("ls", "--config", config, "--json")
        self.assertEqual(code, 0, err)
        rows = {r["repository"]: r for r in json.loads(out)}
        self.assertEqual(set(rows), {"library/both", "library/local", "library/remote"})
        self.assertEqual(rows["library/both"]["tiers"], ["local", "bucket"])
        self.assertEqual(rows["library/local"]["tiers"], ["local"])
        self.assertEqual(rows["library/remote"]["tiers"], ["bucket"])
        row = rows["library/remote"]
        self.assertEqual((row["digest"], row["bucket_digest"]), (remote.digest, remote.digest))
        self.assertEqual((row["blobs_cached"], row["bucket_blobs"], row["blobs"]), (0, 4, 4))
        self.assertEqual(row["platforms"], ["linux/amd64", "linux/arm64"])
        self.assertGreater(row["bucket_size"], sum(len(b) for b in remote.blobs.values()))
        self.assertEqual(row["size"], 0)
        self.assertIsNotNone(row["checked"])
        row = rows["library/both"]
        self.assertEqual((row["blobs_cached"], row["bucket_blobs"]), (3, 3))
        self.assertEqual(row["digest"], both.digest)
        self.assertEqual(rows["library/local"]["bucket_digest"], None)
        self.assertEqual(rows["library/local"]["digest"], local.digest)

        code, out, _ = yield run_in_thread("ls", "--config", config)
        self.assertEqual(code, 0)
        self.assertRegex(out, r"docker.io/library/both:1 +sha256:\S+ +both ")
        self.assertRegex(out, r"docker.io/library/local:1 +sha256:\S+ +local ")
        self.assertRegex(out, r"docker.io/library/remote:2 +sha256:\S+ +bucket .* 0/4 +4/4 ")

        # A machine with the configuration and no cache directory lists the bucket alone.
        code, out, err = yield run_in_thread("ls", "--config", self.config_file(self.mktemp()), "--json")
        self.assertEqual(code, 0, err)
        self.assertIn("the bucket only", err)
        self.assertEqual(sorted(r["repository"] for r in json.loads(out)), ["library/both", "library/remote"])

    @defer.inlineCallbacks
    def test_stats_counts_the_bucket_per_kind(self):
        first = self.mirror()
        a = yield self.shared_image(first, "library/a", "1", layer_sizes=[200_000, 50_000])
        b = yield self.shared_image(first, "library/b", "1", layer_sizes=[10_000])
        code, out, err = yield run_in_thread("stats", "--config", self.config_file(first.cache_dir))
        self.assertEqual(code, 0, err)
        self.assertIn("blobs                    5", out)  # the local tier's lines, as without a bucket
        blob_bytes = sum(len(d) for image in (a, b) for d in image.blobs.values())
        bucket = out.split("bucket ", 1)[1]
        self.assertIn(f"s3://{self.sw.bucket}/{self.prefix}", bucket)
        blobs = re.search(r"\n  blobs +(\d+) +(\S+) (\S+)", bucket)
        self.assertEqual(blobs[1], "5")
        self.assertEqual(blobs.group(2, 3), (f"{blob_bytes / 1000:.1f}", "kB"))
        self.assertRegex(bucket, r"\n  manifests +2 ")
        self.assertRegex(bucket, r"\n  tags +2 +\S+ \S+  in 2 repositories")

    @defer.inlineCallbacks
    def test_wrong_credentials_are_one_line_naming_the_key(self):
        root = self.mirror().cache_dir
        cases = [
            ({"secret_key": "not-the-secret"}, "storage.s3.secret_key"),
            ({"access_key": "nobody-we-know"}, "storage.s3.access_key"),
            ({"endpoint": f"http://127.0.0.1:{free_ports(1)[0]}"}, "storage.s3.endpoint"),
        ]
        for command in ("ls", "stats", "verify", "purge"):
            for s3, key in cases:
                argv = [command, "--config", self.config_file(root, **s3)] + (["x"] if command == "purge" else [])
                code, out, err = yield run_in_thread(*argv)
                self.assertEqual(code, 2, f"{command} {s3}: {out} {err}")
                self.assertEqual(err.count("\n"), 1, err)
                self.assertTrue(err.startswith(f"dioproxy {command}: {key}: "), err)
                self.assertNotIn("Traceback", err + out)


class VerifyTests(_AdminTest):
    @defer.inlineCallbacks
    def test_a_flipped_byte_is_found_and_only_it_repaired(self):
        first = self.mirror()
        image = yield self.shared_image(first, "library/app", "1", layer_sizes=[3 * MB, 40_000])
        config = self.config_file(self.mktemp())  # the bucket alone
        code, out, err = yield run_in_thread("verify", "--config", config)
        self.assertEqual(code, 0, out + err)
        self.assertIn("bucket: verified 3 blobs", out)
        self.assertIn("1 manifests, 1 tags: 0 damaged", out)

        layer = image.layer_digests[0]
        damaged = bytearray(image.blobs[layer])
        damaged[MB + 7] ^= 0x01
        yield self.put(blob_key(layer), bytes(damaged))
        stored = yield self.object(manifest_key(image.digest))
        yield self.put(manifest_key(image.digest), stored[:-1] + b" ")
        yield self.put(tag_key("docker.io", "library/app", "broken"), b"{not json")
        before = yield self.keys()

        code, out, _ = yield run_in_thread("verify", "--config", config, "-j", "3")
        self.assertEqual(code, 1, out)
        self.assertEqual(out.count("DAMAGED"), 3, out)
        self.assertIn(f"DAMAGED  bucket blob {layer}: content has digest sha256:", out)
        self.assertIn(f"DAMAGED  bucket manifest {image.digest}: content has digest", out)
        self.assertIn("DAMAGED  bucket tag docker.io/library/app:broken: unreadable entry", out)
        self.assertEqual((yield self.keys()), before, "verify without --repair removed something")

        code, out, _ = yield run_in_thread("verify", "--repair", "--config", config)
        self.assertEqual(code, 0, out)
        self.assertEqual(out.count("removed "), 3, out)
        gone = {blob_key(layer), manifest_key(image.digest), tag_key("docker.io", "library/app", "broken")}
        self.assertEqual((yield self.keys()), before - gone, "repair removed a good object, or kept a damaged one")
        for digest, data in image.blobs.items():
            if digest != layer:
                self.assertEqual((yield self.object(blob_key(digest))), data)
        code, out, _ = yield run_in_thread("verify", "--config", config)
        self.assertEqual(code, 0, out)

        # A replica with an empty tier fetches what was removed from the upstream, and the bucket gets it back.
        self.fake.clear_requests()
        second = self.mirror()
        yield self.pull(second, "library/app", image)
        self.assertEqual(self.fake.count("cdn", "GET", layer), 1)
        yield second.mirror.bucket.idle()
        self.assertEqual((yield self.object(blob_key(layer))), image.blobs[layer])

    @defer.inlineCallbacks
    def test_repair_keeps_an_object_replaced_since_it_was_read(self):
        data = os.urandom(100_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        yield self.put(blob_key(digest), data[:-1] + b"x")
        scan = BucketScan(S3Storage(**self.s3_config()), timeout=10)
        checked = yield threads.deferToThread(scan.hash, "blob", blob_key(digest))
        self.assertNotEqual(checked.digest, digest)
        yield self.put(blob_key(digest), data)  # a replica replaced it with verified bytes meanwhile
        removed = yield threads.deferToThread(scan.delete, blob_key(digest), checked.etag)
        self.assertFalse(removed)
        self.assertEqual((yield self.object(blob_key(digest))), data)

    @defer.inlineCallbacks
    def test_memory_stays_flat_however_large_the_object(self):
        """A blob of 96 MB is hashed in 1 MiB chunks: the command's peak RSS grows by far less than the blob."""
        small = os.urandom(1000)
        yield self.put(blob_key("sha256:" + hashlib.sha256(small).hexdigest()), small)
        config = self.config_file(self.mktemp())
        baseline = yield threads.deferToThread(peak_rss, "verify", "--config", config)
        path = self.mktemp()
        sha = hashlib.sha256()
        with open(path, "wb") as f:
            for _ in range(96):
                chunk = os.urandom(MB)
                sha.update(chunk)
                f.write(chunk)
        key = self.prefix + blob_key("sha256:" + sha.hexdigest())
        yield threads.deferToThread(self.s3.upload_file, path, self.sw.bucket, key)
        peak = yield threads.deferToThread(peak_rss, "verify", "--config", config)
        print(f"\nverify peak RSS: {baseline / MB:.1f} MB with a 1 kB blob, {peak / MB:.1f} MB with a 96 MB one")
        self.assertLess(peak - baseline, 24 * MB)


def peak_rss(*argv: str) -> int:
    """Run ``dioproxy ARGV`` in a fresh Python; its peak RSS in bytes (it must succeed). Read from VmHWM, which
    belongs to the new process image: ``ru_maxrss`` would carry the forking test process's own peak."""
    script = (
        "import re, sys; from dioproxy import admin; code = admin.main(sys.argv[1:]); "
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1], file=sys.stderr); "
        "sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return int(done.stderr.strip().splitlines()[-1]) * 1024


class PurgeTests(_AdminTest):
    @defer.inlineCallbacks
    def test_purge_removes_only_what_no_other_tag_refers_to(self):
        shared_b, shared_c = os.urandom(30_000), os.urandom(40_000)
        first = self.mirror()
        a = yield self.shared_image(first, "library/a", "1", layers=[shared_b, shared_c, os.urandom(20_000)])
        b = yield self.shared_image(first, "library/b", "1", layers=[shared_b])
        other = self.mirror()  # another replica's image: its tag is only in the bucket
        c = yield self.shared_image(other, "library/c", "1", layers=[shared_c])
        config = self.config_file(first.cache_dir)
        before = yield self.keys()

        code, out, _ = yield run_in_thread("purge", "a", "--config", config, "--dry-run")
        self.assertEqual(code, 0, out)
        self.assertIn("would remove tag docker.io/library/a:1 from the bucket", out)
        self.assertIn("would remove 3 bucket objects", out)
        self.assertEqual((yield self.keys()), before, "a dry run removed something")

        code, out, err = yield run_in_thread("purge", "a", "--config", config, "-v")
        self.assertEqual(code, 0, out + err)
        self.assertIn("removed tag docker.io/library/a:1\n", out)  # the local one
        self.assertIn("removed tag docker.io/library/a:1 from the bucket", out)
        unique = a.layer_digests[2]
        gone = {
            tag_key("docker.io", "library/a", "1"),
            manifest_key(a.digest),
            blob_key(a.manifests[0].config_digest),
            blob_key(unique),
        }
        self.assertEqual((yield self.keys()), before - gone)
        for image in (b, c):  # b's tag is local and in the bucket, c's in the bucket only
            for digest, data in image.blobs.items():
                self.assertEqual((yield self.object(blob_key(digest))), data)
        self.assertFalse(os.path.exists(first.blob_file(unique)))

    @defer.inlineCallbacks
    def test_purge_older_than_goes_by_the_last_check_of_the_tag(self):
        first = self.mirror()
        old = yield self.shared_image(first, "library/old", "1", layer_sizes=[10_000])
        new = yield self.shared_image(first, "library/new", "1", layer_sizes=[10_000])
        key = tag_key("docker.io", "library/old", "1")
        entry = json.loads((yield self.object(key)))
        entry["checked"] = 1_000_000_000  # no replica asked the upstream about it since 2001
        yield self.put(key, json.dumps(entry).encode())
        before = yield self.keys()
        code, out, err = yield run_in_thread(
            "purge", "--older-than", "30d", "--config", self.config_file(self.mktemp())
        )
        self.assertEqual(code, 0, out + err)
        self.assertIn("removed tag docker.io/library/old:1 from the bucket", out)
        gone = {key, manifest_key(old.digest)} | {blob_key(d) for d in old.blobs}
        self.assertEqual((yield self.keys()), before - gone)
        self.assertTrue(all(blob_key(d) in before - gone for d in new.blobs))

    @defer.inlineCallbacks
    def test_an_unknown_tree_blocks_every_object_deletion(self):
        first = self.mirror()
        a = yield self.shared_image(first, "library/a", "1", layer_sizes=[10_000])
        missing = "sha256:" + "0" * 64  # a tag whose manifest is in neither tier: it may refer to a's blobs
        entry = {"digest": missing, "media_type": "application/vnd.oci.image.index.v1+json", "size": 1, "checked": 0}
        yield self.put(tag_key("docker.io", "library/z", "1"), json.dumps(entry).encode())
        before = yield self.keys()
        code, out, err = yield run_in_thread("purge", "a", "--config", self.config_file(self.mktemp()))
        self.assertEqual(code, 0, out + err)
        self.assertIn("no blob or manifest removed from the bucket", err)
        self.assertIn(f"manifest {missing} (in neither tier)", err)
        self.assertEqual((yield self.keys()), before - {tag_key("docker.io", "library/a", "1")})
        self.assertIn(blob_key(a.layer_digests[0]), before)
