"""
Tests for L{mtlsproxy_example.selectors}, written with L{mtlsproxy.testing}.
"""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.testing import connectionFacts, fakePool, pickMany, verifySelectorPlugin

from ..selectors import FirstAvailable, firstAvailable


class FirstAvailableTests(SynchronousTestCase):
    """
    Tests for L{FirstAvailable} and its plugin.
    """

    def test_plugin(self) -> None:
        """
        When the plugin is checked against mtlsproxy's contract, it passes.
        """
        verifySelectorPlugin(firstAvailable)
        self.assertEqual(firstAvailable.name, "first_available")

    def test_firstTakesEverything(self) -> None:
        """
        When every member is available, the first one gets every connection,
        whatever the weights and the load.
        """
        pool = fakePool(1, 5, 5)
        pool[0].activeConnections = 100
        counts = pickMany(FirstAvailable(), pool, connectionFacts(), 50)
        self.assertEqual(counts, Counter({pool[0]: 50}))

    def test_standbyTakesOver(self) -> None:
        """
        When the first member is unhealthy, the second gets the connections,
        until the first is healthy again.
        """
        pool = fakePool(1, 1, 1)
        pool[0].healthy = False
        self.assertEqual(pickMany(FirstAvailable(), pool, n=10), Counter({pool[1]: 10}))
        pool[0].healthy = True
        self.assertEqual(pickMany(FirstAvailable(), pool, n=10), Counter({pool[0]: 10}))

    def test_retryTakesNext(self) -> None:
        """
        When the first member was already tried for a connection, the next
        one is chosen.
        """
        pool = fakePool(1, 1, 1)
        chosen = FirstAvailable().pick(pool.candidates(exclude=[pool[0]]), connectionFacts())
        self.assertIs(chosen, pool[1])
