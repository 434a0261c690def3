"""Our thread pools: work runs off the reactor, and a caller never waits past the pool's deadline."""

import threading

from twisted.internet import reactor
from twisted.trial import unittest

from dioproxy.pools import BlockingPool, Pools, PoolTimeout


class PoolTests(unittest.TestCase):
    def setUp(self):
        self.pool = BlockingPool(reactor, "test", 1, timeout=5.0)
        self.addCleanup(self.pool.stop)

    async def test_runs_in_a_thread_of_its_own(self):
        name = await self.pool.run(lambda: threading.current_thread().name)
        self.assertIn("dioproxy-test", name)

    async def test_a_stuck_call_fails_after_its_deadline(self):
        release = threading.Event()
        self.addCleanup(release.set)
        with self.assertRaises(PoolTimeout):
            await self.pool.run(release.wait, 10, timeout=0.2)
        # The pool's one thread is still stuck: the next caller times out too instead of waiting for good.
        with self.assertRaises(PoolTimeout):
            await self.pool.run(lambda: None, timeout=0.2)
        release.set()
        self.assertEqual(await self.pool.run(lambda: 42), 42)

    def test_pools_are_separate(self):
        pools = Pools(reactor)
        self.addCleanup(pools.stop)
        self.assertEqual(len({id(pools.auth), id(pools.disk), id(pools.index)}), 3)
