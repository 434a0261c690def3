"""Config, routing, name grammar, challenge and Range parsing: the pure functions every request goes through."""

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from dioproxy.config import ConfigError, build_config, parse_duration
from dioproxy.errors import RegistryError
from dioproxy.names import check_digest, check_name, check_reference
from dioproxy.routing import resolve
from dioproxy.streaming import parse_range
from dioproxy.upstream import parse_challenge

DIGEST = "sha256:" + "a" * 64


class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        config = build_config()
        self.assertEqual(config.upstreams["docker.io"].url, "https://registry-1.docker.io")
        for registry in ("ghcr.io", "quay.io", "gcr.io", "registry.k8s.io", "mcr.microsoft.com", "nvcr.io"):
            self.assertIn(registry, config.upstreams)
        self.assertEqual(config.tag_ttl, 300)
        self.assertEqual(config.cache_dir, "./data")
        self.assertTrue(config.cache_enabled)

    def test_file_and_overrides(self):
        config = build_config(
            {
                "upstreams": {"ghcr.io": {"url": "http://127.0.0.1:5001", "username": "u", "password": "p"}},
                "hosts": {"ghcr.mirror.example": "ghcr.io"},
                "cache": {"dir": "/srv/cache", "tag_ttl": "2m"},
            },
            ["docker.io=http://127.0.0.1:5000/", "ghcr.io=http://127.0.0.1:6000"],
        )
        self.assertEqual(config.upstreams["docker.io"].url, "http://127.0.0.1:5000")
        self.assertEqual(config.upstreams["ghcr.io"].url, "http://127.0.0.1:6000")
        self.assertEqual(config.upstreams["ghcr.io"].credentials, ("u", "p"), "override keeps the credentials")
        self.assertEqual(config.hosts, {"ghcr.mirror.example": "ghcr.io"})
        self.assertEqual((config.cache_dir, config.tag_ttl), ("/srv/cache", 120))

    def test_bad_configs_name_the_key(self):
        cases = [
            ({"upstreams": {"ghcr.io": {"url": "ftp://x"}}}, "upstreams.ghcr.io.url"),
            ({"upstreams": {"ghcr.io": {}}}, "upstreams.ghcr.io.url"),
            ({"upstreams": {"ghcr.io": {"url": "http://x", "usr": "a"}}}, "upstreams.ghcr.io.usr"),
            ({"upstreams": {"ghcr.io": {"url": "http://x", "username": "a"}}}, "upstreams.ghcr.io"),
            ({"upstreams": {"not a host": "http://x"}}, "upstreams.not a host"),
            ({"hosts": {"a.example": "nowhere.io"}}, "hosts.a.example"),
            ({"cache": {"tag_ttl": "soon"}}, "cache.tag_ttl"),
            ({"cache": {"tag_ttl": 10**400}}, "cache.tag_ttl"),
            ({"cache": {"tag_ttl": float("nan")}}, "cache.tag_ttl"),
            ({"hosts": {"a.example": ["ghcr.io"]}}, "hosts.a.example"),
            ({"cache": {"enabled": "yes"}}, "cache.enabled"),
            ({"cache": {"size": 1}}, "cache.size"),
            ({"cache": {"accel_redirect": "internal"}}, "cache.accel_redirect"),
            ({"default_registry": ["docker.io"]}, "default_registry"),
            ({"caches": {}}, "caches"),
            ({"default_registry": "nowhere.io"}, "default_registry"),
            ([1, 2], "(top level)"),
        ]
        for data, key in cases:
            with self.assertRaises(ConfigError, msg=repr(data)) as caught:
                build_config(data)
            self.assertIn(key, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            build_config(None, ["docker.io"])
        self.assertIn("--upstream", str(caught.exception))

    def test_durations(self):
        self.assertEqual(parse_duration("90s", "k"), 90)
        self.assertEqual(parse_duration("1.5h", "k"), 5400)
        self.assertEqual(parse_duration(0, "k"), 0)
        self.assertRaises(ConfigError, parse_duration, -1, "k")
        self.assertRaises(ConfigError, parse_duration, True, "k")


class StorageConfigTests(unittest.TestCase):
    """``storage.s3``: the object store behind the cache dir (dioproxy/objectstore.py)."""

    def s3(self, environ=None, **spec):
        return build_config({"storage": {"s3": spec}}, environ=environ or {}).storage.s3

    def test_defaults(self):
        self.assertIsNone(build_config(environ={}).storage.s3)
        s3 = self.s3(bucket="cache")
        self.assertEqual((s3.bucket, s3.endpoint, s3.region, s3.prefix), ("cache", None, "us-east-1", ""))
        self.assertEqual((s3.access_key, s3.secret_key, s3.redirect, s3.redirect_ttl), (None, None, False, 300))

    def test_values(self):
        s3 = self.s3(
            bucket="my.cache-1",
            endpoint="http://127.0.0.1:8333/",
            region="eu-central-1",
            prefix="a/b",
            access_key="AK",
            secret_key="very-secret",
            redirect=True,
            redirect_ttl="90s",
        )
        self.assertEqual((s3.endpoint, s3.region, s3.prefix), ("http://127.0.0.1:8333", "eu-central-1", "a/b/"))
        self.assertEqual((s3.access_key, s3.secret_key, s3.redirect, s3.redirect_ttl), ("AK", "very-secret", True, 90))
        self.assertNotIn(
            "very-secret",
            repr(
                build_config(
                    {"storage": {"s3": {"bucket": "abc", "access_key": "AK", "secret_key": "very-secret"}}}, environ={}
                )
            ),
        )

    def test_credentials_from_files_and_environment(self):
        ak, sk = self.mktemp(), self.mktemp()
        with open(ak, "w") as f:
            f.write("AK-FILE\n")
        with open(sk, "w") as f:
            f.write("SK-FILE\nignored\n")
        s3 = self.s3(bucket="abc", access_key_file=ak, secret_key_file=sk)
        self.assertEqual((s3.access_key, s3.secret_key), ("AK-FILE", "SK-FILE"))
        env = {"AWS_ACCESS_KEY_ID": "AK-ENV", "AWS_SECRET_ACCESS_KEY": "SK-ENV"}
        s3 = self.s3(env, bucket="abc")
        self.assertEqual((s3.access_key, s3.secret_key), ("AK-ENV", "SK-ENV"))
        s3 = self.s3(env, bucket="abc", access_key="AK", secret_key="SK")
        self.assertEqual((s3.access_key, s3.secret_key), ("AK", "SK"), "the config file wins over the environment")

    def test_bad_values_name_the_key(self):
        missing = self.mktemp()
        cases = [
            ({}, "storage.s3.bucket: missing"),
            ({"bucket": "A_B"}, "storage.s3.bucket"),
            ({"bucket": "ab"}, "storage.s3.bucket"),
            ({"bucket": ["abc"]}, "storage.s3.bucket"),
            ({"bucket": "abc", "endpoint": "s3.lan:8333"}, "storage.s3.endpoint"),
            ({"bucket": "abc", "region": "EU Central"}, "storage.s3.region"),
            ({"bucket": "abc", "prefix": "/abs"}, "storage.s3.prefix"),
            ({"bucket": "abc", "prefix": 7}, "storage.s3.prefix"),
            ({"bucket": "abc", "access_key": "AK"}, "storage.s3: access_key and secret_key go together"),
            ({"bucket": "abc", "access_key": "AK", "secret_key": ""}, "storage.s3.secret_key"),
            ({"bucket": "abc", "access_key": "A", "access_key_file": "f", "secret_key": "S"}, "storage.s3.access_key"),
            ({"bucket": "abc", "access_key": "A", "secret_key_file": missing}, "storage.s3.secret_key_file"),
            ({"bucket": "abc", "redirect": "yes"}, "storage.s3.redirect"),
            ({"bucket": "abc", "redirect_ttl": "soon"}, "storage.s3.redirect_ttl"),
            ({"bucket": "abc", "redirect_ttl": "8d"}, "storage.s3.redirect_ttl"),
            ({"bucket": "abc", "redirect_ttl": 0}, "storage.s3.redirect_ttl"),
            ({"bucket": "abc", "secret": "x"}, "storage.s3.secret"),
        ]
        for spec, key in cases:
            with self.assertRaises(ConfigError, msg=repr(spec)) as caught:
                self.s3(**spec)
            self.assertIn(key, str(caught.exception))
        for data, key in [({"storage": {"gcs": {}}}, "storage.gcs"), ({"storage": ["s3"]}, "storage")]:
            with self.assertRaises(ConfigError) as caught:
                build_config(data, environ={})
            self.assertIn(key, str(caught.exception))


class RoutingTests(unittest.TestCase):
    def setUp(self):
        self.config = build_config({"hosts": {"ghcr.mirror.example": "ghcr.io"}})

    def route(self, name, ns=None, host=None):
        target = resolve(self.config, name, ns, host)
        return target.registry, target.name

    def test_order(self):
        self.assertEqual(self.route("alpine"), ("docker.io", "library/alpine"))
        self.assertEqual(self.route("library/alpine"), ("docker.io", "library/alpine"))
        self.assertEqual(self.route("owner/img", ns="ghcr.io"), ("ghcr.io", "owner/img"))
        self.assertEqual(self.route("ghcr.io/owner/img"), ("ghcr.io", "owner/img"))
        self.assertEqual(self.route("docker.io/alpine"), ("docker.io", "library/alpine"))
        self.assertEqual(self.route("owner/img", host="ghcr.mirror.example:8004"), ("ghcr.io", "owner/img"))
        self.assertEqual(self.route("owner/img", host="127.0.0.1:8004"), ("docker.io", "owner/img"))
        self.assertEqual(self.route("quay.io/a/b", ns="quay.io"), ("quay.io", "a/b"))

    def test_unconfigured_registries_are_refused(self):
        for name, ns in [("evil.example/x", None), ("x/y", "evil.example"), ("localhost:5000/x", None)]:
            with self.assertRaises(RegistryError) as caught:
                resolve(self.config, name, ns)
            self.assertEqual((caught.exception.status, caught.exception.code), (404, "NAME_UNKNOWN"))

    def test_invalid_names(self):
        for name in ["", "UPPER/case", "a/../b", "a//b", "a/./b", "-a", "a\\b", "%2e%2e/x", "a" * 300]:
            with self.assertRaises(RegistryError) as caught:
                resolve(self.config, name)
            self.assertEqual(caught.exception.code, "NAME_INVALID", name)


class GrammarTests(unittest.TestCase):
    def test_references(self):
        self.assertEqual(check_reference("v1.2_3-x"), "v1.2_3-x")
        self.assertEqual(check_reference(DIGEST), DIGEST)
        for bad in ["", ".x", "a" * 129, "sha256:abc", "md5:" + "a" * 32, "x\r\ny", "sha256:" + "A" * 64]:
            self.assertRaises(RegistryError, check_reference, bad)
        self.assertRaises(RegistryError, check_digest, "sha512:" + "a" * 128)

    @given(st.text(max_size=80))
    def test_names_never_escape(self, name):
        """Whatever is accepted as a name is safe as a relative path."""
        try:
            check_name(name)
        except RegistryError:
            return
        self.assertFalse(name.startswith("/"))
        self.assertNotIn("..", name.split("/"))
        self.assertNotIn("\\", name)
        self.assertNotIn("\x00", name)


class ChallengeTests(unittest.TestCase):
    def test_docker_hub(self):
        c = parse_challenge(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull,push"'
        )
        self.assertEqual(c.scheme, "bearer")
        self.assertEqual(c.params["realm"], "https://auth.docker.io/token")
        self.assertEqual(c.params["scope"], "repository:library/alpine:pull,push")

    def test_basic_and_garbage(self):
        self.assertEqual(parse_challenge('Basic realm="x"').scheme, "basic")
        self.assertIsNone(parse_challenge(""))

    @given(st.text(max_size=200))
    def test_never_raises(self, text):
        parse_challenge(text)


class RangeTests(unittest.TestCase):
    def test_ranges(self):
        self.assertIsNone(parse_range(None, 10))
        self.assertEqual(parse_range("bytes=0-4", 10), (0, 5))
        self.assertEqual(parse_range("bytes=5-", 10), (5, 10))
        self.assertEqual(parse_range("bytes=-3", 10), (7, 10))
        self.assertEqual(parse_range("bytes=8-100", 10), (8, 10))
        self.assertIs(parse_range("bytes=10-", 10), False)
        self.assertIsNone(parse_range("bytes=5-2", 10), "last < first is invalid: ignored (RFC 9110)")
        self.assertIsNone(parse_range("bytes=0-1,3-4", 10), "several ranges: serve it whole")
        self.assertIsNone(parse_range("items=0-1", 10))
        self.assertIsNone(parse_range("bytes=\u0661-2", 10), "only ASCII digits")
        self.assertIsNone(parse_range("bytes=1-" + "9" * 5000, 10), "an absurd number is ignored, not a 500")
        self.assertEqual(parse_range("Bytes = 2 - 3", 10), (2, 4))
        self.assertIs(parse_range("bytes=-5", 0), False, "no Content-Range can say bytes 0--1/0")
        self.assertIs(parse_range("bytes=0-0", 0), False)
        self.assertIs(parse_range("bytes=-0", 10), False)

    @given(
        st.one_of(
            st.text(max_size=40),
            st.builds(
                "bytes={}-{}".format,
                st.one_of(st.just(""), st.integers(0, 2000)),
                st.one_of(st.just(""), st.integers(0, 2000)),
            ),
        ),
        st.one_of(st.integers(0, 1500), st.integers(0, 10**12)),
    )
    def test_ranges_stay_inside(self, header, size):
        """Satisfiable ranges are built too (numbers near the size): what we send is inside the blob and is what
        RFC 9110 asks for."""
        wanted = parse_range(header, size)
        if isinstance(wanted, tuple):
            start, end = wanted
            self.assertTrue(0 <= start < end <= size)
        built = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)", header)
        if not built or built.groups() == ("", ""):
            return
        first, last = built.groups()
        if first and last and int(last) < int(first):
            self.assertIsNone(wanted)
        elif first:
            expected = (int(first), min(size, int(last) + 1) if last else size) if int(first) < size else False
            self.assertEqual(wanted, expected)
        elif last:
            self.assertEqual(wanted, (max(0, size - int(last)), size) if int(last) and size else False)


class DocumentedConfigTests(unittest.TestCase):
    def test_the_example_in_the_reference_is_valid(self):
        """docs/configuration.md's example file is accepted as it stands, key for key."""
        import os
        import re

        import yaml

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")
        with open(path, encoding="utf-8") as f:
            block = re.search(r"```yaml\n(.*?)```", f.read(), re.S).group(1)
        config = build_config(yaml.safe_load(block))
        self.assertEqual(config.cache_max_size, 50 * 10**9)
        self.assertEqual(config.security.access["docker.io"].deny, ("myorg/secret-*",))
        self.assertEqual(config.accel_redirect, "/_dioproxy/blobs/")
        self.assertEqual((config.storage.s3.bucket, config.storage.s3.prefix), ("dioproxy", "mirror/"))


class CoordinationConfigTests(unittest.TestCase):
    def coordination(self, **spec):
        return build_config({"coordination": spec}, environ={}).coordination

    def test_values(self):
        c = self.coordination(redis="redis://r:6379/1", secret="s" * 16, advertise="http://10.0.0.5:8004/")
        self.assertEqual((c.redis, c.secret, c.advertise), ("redis://r:6379/1", "s" * 16, "http://10.0.0.5:8004"))
        self.assertNotIn("s" * 16, repr(c))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-a-file-0123456789\nignored\n")
        self.assertEqual(self.coordination(redis="redis://r", secret_file=path).secret, "from-a-file-0123456789")
        self.assertIsNone(build_config(environ={}).coordination)

    def test_errors_name_the_key(self):
        cases = [
            ({"secret": "s" * 16}, "coordination.redis"),
            ({"redis": "http://r", "secret": "s" * 16}, "coordination.redis"),
            ({"redis": "redis://r", "secret": "short"}, "coordination.secret"),
            ({"redis": "redis://r"}, "coordination.secret"),
            ({"redis": "redis://r", "secret": "s" * 16, "secret_file": "f"}, "coordination.secret: give"),
            ({"redis": "redis://r", "secret_file": "/nonexistent"}, "coordination.secret_file"),
            ({"redis": "redis://r", "secret": "s" * 16, "advertise": "10.0.0.5:8004"}, "coordination.advertise"),
            ({"redis": "redis://r", "secret": "s" * 16, "peers": []}, "coordination.peers"),
        ]
        for spec, key in cases:
            with self.assertRaises(ConfigError, msg=spec) as caught:
                self.coordination(**spec)
            self.assertIn(key, str(caught.exception), spec)
