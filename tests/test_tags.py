"""Tag lists: paged as the spec says even when the upstream ignores ``n``/``last``; from the cache when it is down."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests.harness import Proxy, start_upstream
from tests.test_outages import STALE, Switch

TAGS = ["1.0", "1.1", "2.0"]


class TagListTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = start_upstream(self)
        for tag in TAGS:
            self.fake.add_image("library/hello", tag, layer_sizes=[100])
        self.switch = Switch(self, self.fake.registry_url)
        self.proxy = Proxy(self, self.switch.url, cache={"tag_ttl": 0})
        for tag in TAGS:  # the cache learns the tags by their pulls
            response = yield self.proxy.get(f"/v2/library/hello/manifests/{tag}")
            self.assertEqual(response.code, 200)
            yield response.content()
        yield self.proxy.mirror.storage.settled()

    @defer.inlineCallbacks
    def listing(self, path: str):
        response = yield self.proxy.get(path)
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        return json.loads(body)["tags"], response.headers.getRawHeaders("Link"), response.headers

    @defer.inlineCallbacks
    def pages(self, path: str) -> list[list[str]]:
        """Follow the ``Link`` chain from ``path``; each hop must point at the mirror."""
        found = []
        while path:
            tags, link, _ = yield self.listing(path)
            found.append(tags)
            path = None
            if link:
                target = link[0].split(">")[0].lstrip("<")
                self.assertTrue(target.startswith(self.proxy.url), link)
                path = target[len(self.proxy.url) :]
        return found

    @defer.inlineCallbacks
    def test_paging_applied_when_the_upstream_ignores_it(self):
        self.fake.ignore_paging = True
        self.assertEqual((yield self.pages("/v2/library/hello/tags/list?n=2")), [["1.0", "1.1"], ["2.0"]])
        tags, link, _ = yield self.listing("/v2/library/hello/tags/list?last=1.0")
        self.assertEqual((tags, link), (["1.1", "2.0"], None))
        tags, _, _ = yield self.listing("/v2/library/hello/tags/list")
        self.assertEqual(tags, TAGS)

    @defer.inlineCallbacks
    def test_upstream_paging_passes_through(self):
        self.assertEqual((yield self.pages("/v2/library/hello/tags/list?n=1")), [["1.0"], ["1.1"], ["2.0"]])

    @defer.inlineCallbacks
    def test_from_the_cache_when_the_upstream_is_down(self):
        self.switch.set_mode("cut")
        tags, _, headers = yield self.listing("/v2/library/hello/tags/list")
        self.assertEqual((tags, headers.getRawHeaders("Warning")), (TAGS, STALE))
        self.assertEqual((yield self.pages("/v2/library/hello/tags/list?n=2")), [["1.0", "1.1"], ["2.0"]])
        tags, link, headers = yield self.listing("/v2/library/hello/tags/list?n=5&last=1.0")
        self.assertEqual((tags, link, headers.getRawHeaders("Warning")), (["1.1", "2.0"], None, STALE))
        # A repository the cache knows no tags of: the outage, said plainly.
        response = yield self.proxy.get("/v2/library/other/tags/list")
        self.assertEqual(response.code, 503)
        self.assertIn(b"UNAVAILABLE", (yield response.content()))

    @defer.inlineCallbacks
    def test_a_malformed_n_is_the_clients_mistake(self):
        for n in ("x", "-1", "1e3", "9999999999"):
            response = yield self.proxy.get(f"/v2/library/hello/tags/list?n={n}")
            body = json.loads((yield response.content()))
            self.assertEqual((response.code, body["errors"][0]["code"]), (400, "PAGINATION_NUMBER_INVALID"), n)


class PrivateTagListTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_credentialed_upstream_fails_closed(self):
        """Tag names of a private repository are not told to whoever asks during an outage."""
        fake = start_upstream(self, users={"bot": "pat"}, private=["org/secret"])
        fake.add_image("org/secret", "1.0", layer_sizes=[100])
        switch = Switch(self, fake.registry_url)
        upstream = {"url": switch.url, "username": "bot", "password": "pat", "redirect_hosts": ["127.0.0.1"]}
        proxy = Proxy(self, switch.url, cache={"tag_ttl": 0}, upstreams={"ghcr.io": upstream})
        response = yield proxy.get("/v2/ghcr.io/org/secret/manifests/1.0")
        self.assertEqual(response.code, 200)
        yield response.content()
        yield proxy.mirror.storage.settled()
        switch.set_mode("cut")
        response = yield proxy.get("/v2/ghcr.io/org/secret/tags/list")
        body = yield response.content()
        self.assertEqual(response.code, 503, body)
        self.assertNotIn(b"1.0", body)
