"""Logins under attack: bcrypt in its own pool, failed logins throttled per client, our tokens unforgeable."""

import base64
import json
import sys
import threading
import time

import bcrypt
from twisted.internet import defer
from twisted.trial import unittest

from dioproxy import auth
from tests.harness import Proxy, start_upstream


def basic(user, password):
    return {"Authorization": ["Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()]}


def write_htpasswd(testcase, cost):
    path = testcase.mktemp()
    with open(path, "wb") as f:
        f.write(b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(cost)) + b"\n")
    return path


class CheckCounter:
    """Counts bcrypt checks and the threads they ran in."""

    def __init__(self, testcase):
        self.threads = []
        real = auth.bcrypt.checkpw

        def checkpw(password, hashed):
            self.threads.append(threading.current_thread().name)
            return real(password, hashed)

        testcase.patch(auth.bcrypt, "checkpw", checkpw)


class ThrottleTests(unittest.TestCase):
    def setUp(self):
        self.fake = start_upstream(self)
        self.image = self.fake.add_image("library/hello", "1.0", layer_sizes=[100])
        self.proxy = Proxy(self, self.fake.registry_url, auth={"htpasswd": write_htpasswd(self, 4)})
        self.checks = CheckCounter(self)

    @defer.inlineCallbacks
    def get(self, path, headers):
        response = yield self.proxy.get(path, headers=headers)
        body = yield response.json()
        return response, body

    @defer.inlineCallbacks
    def test_failed_logins_past_the_limit_get_429_without_bcrypt(self):
        limit = auth.LoginThrottle().limit
        for n in range(limit):
            response, _ = yield self.get("/v2/", basic("alice", f"guess{n}"))
            self.assertEqual(response.code, 401)
        for path in ("/v2/", "/token?scope=repository:library/hello:pull"):
            response, body = yield self.get(path, basic("alice", "one more"))
            self.assertEqual(response.code, 429, path)
            self.assertEqual(body["errors"][0]["code"], "TOOMANYREQUESTS")
            self.assertTrue(1 <= int(response.headers.getRawHeaders("Retry-After")[0]) <= 60)
        self.assertEqual(len(self.checks.threads), limit, "no bcrypt past the limit")

    @defer.inlineCallbacks
    def test_a_concurrent_burst_of_bad_logins_costs_at_most_the_limit(self):
        responses = yield defer.gatherResults(
            [self.proxy.get("/v2/", headers=basic("alice", f"guess{n}")) for n in range(40)]
        )
        codes = [r.code for r in responses]
        for r in responses:
            yield r.content()
        limit = auth.LoginThrottle().limit
        self.assertEqual((codes.count(401), codes.count(429)), (limit, 40 - limit))
        self.assertEqual(len(self.checks.threads), limit)

    @defer.inlineCallbacks
    def test_a_burst_of_pulls_costs_one_bcrypt(self):
        """Concurrent requests with the same new credentials share one check; later ones are remembered."""
        path = "/v2/library/hello/manifests/1.0"
        for _ in range(2):
            responses = yield defer.gatherResults(
                [self.proxy.get(path, headers=basic("alice", "wonderland")) for _ in range(20)]
            )
            for r in responses:
                self.assertEqual((yield r.content()), self.image.body)
        self.assertEqual(len(self.checks.threads), 1)

    @defer.inlineCallbacks
    def test_remembered_credentials_pass_a_throttled_client(self):
        response, _ = yield self.get("/v2/", basic("alice", "wonderland"))
        self.assertEqual(response.code, 200)
        for n in range(auth.LoginThrottle().limit + 1):
            yield self.get("/v2/", basic("alice", f"guess{n}"))
        response, _ = yield self.get("/v2/", basic("alice", "wonderland"))
        self.assertEqual(response.code, 200, "a user already verified is not locked out by an attacker")

    @defer.inlineCallbacks
    def test_bcrypt_runs_in_the_auth_pool(self):
        response, _ = yield self.get("/v2/", basic("alice", "wonderland"))
        self.assertEqual(response.code, 200)
        [thread] = self.checks.threads
        self.assertIn("dioproxy-auth", thread)

    def test_window_and_memory_bounds(self):
        now = [0.0]
        throttle = auth.LoginThrottle(limit=2, window=60, clock=lambda: now[0])

        def done(coroutine):
            return self.successResultOf(defer.ensureDeferred(coroutine))

        done(throttle.attempt("a"))
        done(throttle.attempt("a"))
        self.assertEqual(done(throttle.retry_after("a")), 60)
        self.assertEqual(done(throttle.retry_after("b")), 0, "per client")
        now[0] = 61
        self.assertEqual(done(throttle.retry_after("a")), 0, "the window ends")
        self.patch(auth.LoginThrottle, "MAX_CLIENTS", 3)
        for client in "cdefgh":
            done(throttle.attempt(client))
        self.assertLessEqual(len(throttle._failures), 3)


class LoginStormTests(unittest.TestCase):
    """Issue 9's figure: a logged-in user's uncached manifest while 40 wrong passwords (bcrypt cost 12) arrive.

    The upstream is named ``localhost`` so its name goes through Twisted's resolver, whose threads bcrypt once
    shared.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_logged_in_pull_during_a_storm_of_bad_logins(self):
        fake = start_upstream(self)
        image = fake.add_image("library/hello", "1.0", layer_sizes=[100])
        upstream = fake.registry_url.replace("127.0.0.1", "localhost")
        proxy = Proxy(
            self,
            upstream,
            upstreams={"docker.io": {"url": upstream, "redirect_hosts": ["127.0.0.1"]}},  # its token realm
            auth={"htpasswd": write_htpasswd(self, 12)},
        )
        response = yield proxy.get("/token?scope=repository:library/hello:pull", headers=basic("alice", "wonderland"))
        token = (yield response.json())["token"]
        storm = [proxy.get("/v2/", headers=basic("alice", f"guess{n}")) for n in range(40)]
        began = time.monotonic()
        response = yield proxy.get("/v2/library/hello/manifests/1.0", headers={"Authorization": [f"Bearer {token}"]})
        body = yield response.content()
        elapsed = time.monotonic() - began
        for d in storm:
            yield (yield d).content()
        storm_time = time.monotonic() - began
        print(
            f"\nuncached manifest during 40 bad logins (bcrypt 12): {elapsed * 1000:.0f} ms; "
            f"storm answered in {storm_time:.1f} s",
            file=sys.stderr,
        )
        self.assertEqual(body, image.body)
        self.assertLess(elapsed, 2.0)


class TokenTests(unittest.TestCase):
    """Our tokens: a well-formed forgery and a correctly signed expired token are both refused."""

    def setUp(self):
        self.fake = start_upstream(self)
        self.fake.add_image("library/hello", "1.0", layer_sizes=[100])
        self.proxy = Proxy(self, self.fake.registry_url, auth={"htpasswd": write_htpasswd(self, 4)})
        self.path = "/v2/library/hello/manifests/1.0"

    @defer.inlineCallbacks
    def token(self):
        response = yield self.proxy.get(
            "/token?scope=repository:library/hello:pull", headers=basic("alice", "wonderland")
        )
        return (yield response.json())["token"]

    @defer.inlineCallbacks
    def assert_refused(self, token):
        response = yield self.proxy.get(self.path, headers={"Authorization": [f"Bearer {token}"]})
        self.assertEqual(response.code, 401)
        self.assertIn('error="invalid_token"', response.headers.getRawHeaders("WWW-Authenticate")[0])
        yield response.content()

    @defer.inlineCallbacks
    def test_valid_token_passes(self):
        token = yield self.token()
        response = yield self.proxy.get(self.path, headers={"Authorization": [f"Bearer {token}"]})
        self.assertEqual(response.code, 200)
        yield response.content()

    @defer.inlineCallbacks
    def test_forged_claims_with_a_wrong_signature(self):
        """Real, valid JSON claims (another user, a later expiry) under a signature that does not match them."""
        token = yield self.token()
        payload, _, signature = token.partition(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims.update(sub="mallory", exp=claims["exp"] + 86400)
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        yield self.assert_refused(f"{forged}.{signature}")
        other_key = auth.Tokens("another secret", 300)
        yield self.assert_refused(f"{forged}.{other_key._sign(forged)}")

    @defer.inlineCallbacks
    def test_expired_token_correctly_signed(self):
        tokens = self.proxy.mirror.gate.tokens
        real_clock = tokens.clock
        tokens.clock = lambda: real_clock() - tokens.ttl - 60  # issued long enough ago to have expired
        try:
            token = yield self.token()
        finally:
            tokens.clock = real_clock
        yield self.assert_refused(token)
