# -*- test-case-name: tests.test_selectors -*-
"""
Tests for L{mtlsproxy.selectors} and L{mtlsproxy.pool}.
"""

from collections import Counter

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mtlsproxy.interfaces import IBackendSelector, IBackendSelectorFactory, IMemberState
from mtlsproxy.pool import ConnectionFacts, Member, Pool
from mtlsproxy.selectors import SmoothWeightedRoundRobin, roundRobin, selectorFactories


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


def _pool(*weights: int) -> Pool:
    members = [Member(_MemberConfig("127.0.0.1", 9000 + i, w)) for i, w in enumerate(weights)]
    return Pool("app", members, SmoothWeightedRoundRobin())


FACTS = ConnectionFacts(listener="l", peerHost="127.0.0.1", peerPort=5555)


class RoundRobinTests(SynchronousTestCase):
    """
    Tests for the smooth weighted round robin selector.
    """

    def test_interfaces(self) -> None:
        """
        When checked with verifyObject, the built-in selector, its factory and
        a member provide their interfaces.
        """
        self.assertTrue(verifyObject(IBackendSelectorFactory, roundRobin))
        self.assertTrue(verifyObject(IBackendSelector, roundRobin.newSelector()))
        self.assertTrue(verifyObject(IMemberState, Member(_MemberConfig("h", 1))))

    def test_equalWeightsAlternate(self) -> None:
        """
        When two members have equal weights, picks alternate between them.
        """
        pool = _pool(1, 1)
        picks = [pool.pick(FACTS).port for _ in range(6)]
        self.assertEqual(picks, [9000, 9001] * 3)

    def test_smoothInterleaving(self) -> None:
        """
        When weights are 5, 1, 1, the heavy member's picks are interleaved
        with the others rather than given in one run.
        """
        pool = _pool(5, 1, 1)
        picks = [pool.pick(FACTS).port - 9000 for _ in range(7)]
        self.assertEqual(picks, [0, 0, 1, 0, 2, 0, 0])

    def test_weightsRespected(self) -> None:
        """
        When weights are 1:3, 10,000 picks split 25%/75% within 2 points.
        """
        pool = _pool(1, 3)
        counts = Counter(pool.pick(FACTS).port for _ in range(10000))
        self.assertAlmostEqual(counts[9000] / 10000, 0.25, delta=0.02)
        self.assertAlmostEqual(counts[9001] / 10000, 0.75, delta=0.02)

    def test_zeroWeightNeverPicked(self) -> None:
        """
        When a member has weight 0, it is never picked.
        """
        pool = _pool(0, 1)
        self.assertEqual({pool.pick(FACTS).port for _ in range(10)}, {9001})

    def test_excludedSkipped(self) -> None:
        """
        When a member is excluded (already tried), the other one is picked,
        and when every member is excluded there is no pick.
        """
        pool = _pool(1, 1)
        first = pool.members[0]
        self.assertEqual({pool.pick(FACTS, [first]).port for _ in range(4)}, {9001})
        self.assertIsNone(pool.pick(FACTS, pool.members))

    def test_unavailableSkipped(self) -> None:
        """
        When a member is unhealthy or draining, it is not picked.
        """
        pool = _pool(1, 1, 1)
        pool.members[0].healthy = False
        pool.members[1].draining = True
        self.assertEqual({pool.pick(FACTS).port for _ in range(4)}, {9002})

    def test_registry(self) -> None:
        """
        When selectors are listed, round_robin is among them.
        """
        self.assertIs(selectorFactories()["round_robin"], roundRobin)


class PoolTests(SynchronousTestCase):
    """
    Tests for L{Pool} and L{Member} bookkeeping.
    """

    def test_connectionCounting(self) -> None:
        """
        When connections open and close, the member's counters follow, and
        closing more than were opened is an error.
        """
        member = Member(_MemberConfig("h", 1))
        member.connectionOpened()
        member.connectionOpened()
        member.connectionClosed()
        self.assertEqual((member.activeConnections, member.totalConnections), (1, 2))
        member.connectionClosed()
        self.assertRaises(RuntimeError, member.connectionClosed)

    def test_brokenSelectorContained(self) -> None:
        """
        When a selector raises or returns something that is not a candidate,
        the pool logs it and returns no member instead of propagating.
        """

        class Raising:
            def pick(self, candidates, facts):
                raise ValueError("boom")

        class Foreign:
            def pick(self, candidates, facts):
                return Member(_MemberConfig("other", 2))

        members = [Member(_MemberConfig("h", 1))]
        self.assertIsNone(Pool("p", members, Raising()).pick(FACTS))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIsNone(Pool("p", members, Foreign()).pick(FACTS))
