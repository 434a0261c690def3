"""Content fetched with upstream credentials fails closed: marked only once the upstream confirmed, visible to every
process on the cache directory, never served through another repository the upstream did not vouch for."""

from twisted.internet import defer
from twisted.trial import unittest

from dioproxy.config import build_config
from tests.harness import Proxy, start_upstream


class TokenCacheTests(unittest.TestCase):
    """Tokens are keyed by the credentials they were fetched with, and bounded."""

    def setUp(self):
        self.ghcr = start_upstream(self, users={"bot": "pat", "bot2": "pat2"}, private=["acme/private"])
        self.secret = self.ghcr.add_image("acme/private", "1.0")
        self.ghcr.add_image("acme/private", "2.0")
        self.ghcr.add_image("acme/public", "1.0")
        self.credentialed = {"url": self.ghcr.registry_url, "username": "bot", "password": "pat"}
        self.proxy = Proxy(
            self, self.ghcr.registry_url, upstreams={"ghcr.io": self.credentialed, "quay.io": self.ghcr.registry_url}
        )

    @defer.inlineCallbacks
    def fetch(self, path):
        response = yield self.proxy.get(path)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def test_a_credentialed_token_never_serves_an_anonymous_upstream(self):
        code, _ = yield self.fetch("/v2/quay.io/acme/public/manifests/1.0")  # quay.io learns the challenge
        self.assertEqual(code, 200)
        code, _ = yield self.fetch("/v2/ghcr.io/acme/private/manifests/1.0")
        self.assertEqual(code, 200)
        code, _ = yield self.fetch("/v2/quay.io/acme/private/manifests/1.0")
        self.assertEqual(code, 404, "the anonymous upstream used a token fetched with credentials")

    @defer.inlineCallbacks
    def test_a_reload_drops_the_tokens_of_old_credentials(self):
        code, _ = yield self.fetch("/v2/ghcr.io/acme/private/manifests/1.0")
        self.assertEqual(code, 200)
        mirror = self.proxy.mirror
        self.assertTrue(mirror.tokens._tokens)
        mirror.apply(build_config({"upstreams": {"ghcr.io": self.ghcr.registry_url}}, [], self.proxy.cache_dir))
        self.assertFalse(
            [key for key in mirror.tokens._tokens if key[-1] != "anonymous"], "tokens of old credentials remain"
        )
        code, _ = yield self.fetch("/v2/ghcr.io/acme/private/manifests/2.0")
        self.assertEqual(code, 404, "a token of the removed credentials was used")
        # What was seen with credentials stays private: another repository is asked about, and refused.
        code, _ = yield self.fetch(f"/v2/ghcr.io/acme/public/manifests/{self.secret.digest}")
        self.assertEqual(code, 404)

    def test_the_cache_is_bounded(self):
        from dioproxy.upstream import TokenCache

        clock = [0.0]
        cache = TokenCache(lambda: clock[0], max_entries=3)
        for n in range(5):
            cache.put(("realm", "service", f"repository:r{n}:pull", "anonymous"), f"t{n}", 300)
            if n == 2:
                self.assertEqual(cache.get(("realm", "service", "repository:r0:pull", "anonymous")), "t0")
        self.assertEqual(len(cache), 3)
        self.assertEqual(cache.get(("realm", "service", "repository:r0:pull", "anonymous")), "t0", "recently used")
        self.assertIsNone(cache.get(("realm", "service", "repository:r1:pull", "anonymous")), "least recently used")
        self.assertEqual(cache.get(("realm", "service", "repository:r4:pull", "anonymous")), "t4")

    @defer.inlineCallbacks
    def test_client_chosen_names_cannot_grow_it(self):
        mirror = self.proxy.mirror
        mirror.tokens.max_entries = 5
        for n in range(8):
            code, _ = yield self.fetch(f"/v2/quay.io/made-up/n{n}/manifests/1")
            self.assertEqual(code, 404)
        self.assertLessEqual(len(mirror.tokens), 5)
