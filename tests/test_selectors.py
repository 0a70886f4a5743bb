# -*- test-case-name: tests.test_selectors -*-
"""
Tests for L{mtlsproxy.selectors}, L{mtlsproxy.hashing} and L{mtlsproxy.pool}.
"""

from __future__ import annotations

from collections import Counter
from random import Random
from typing import Any, Callable

import attrs
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsproxy.hashing import (
    encodeParts,
    highestRandomWeight,
    memberIdentity,
    peerAddressKey,
    score,
    unitInterval,
)
from mtlsproxy.interfaces import IBackendSelector, IBackendSelectorFactory, IMemberState
from mtlsproxy.pool import ConnectionFacts, Member, Pool
from mtlsproxy.selectors import (
    BUILTIN_SELECTORS,
    ClientIdentityHash,
    LeastConnections,
    RandomTwoChoices,
    SmoothWeightedRoundRobin,
    SourceIPHash,
    clientIdentityKey,
    roundRobin,
    selectorFactories,
    sourceAddressKey,
)
from mtlsproxy.testing import (
    FakePool,
    connectionFacts,
    fakePool,
    pickMany,
    verifySelectorPlugin,
)


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


def _picked(pool: Pool, facts: ConnectionFacts, exclude: Any = ()) -> Member:
    """
    The member C{pool} picks; fails if it picks none.
    """
    member = pool.pick(facts, exclude)
    if member is None:
        raise AssertionError(f"{pool.name}: no member picked")
    return member


def _pool(*weights: int) -> Pool:
    members = [Member(_MemberConfig("127.0.0.1", 9000 + i, w)) for i, w in enumerate(weights)]
    return Pool("app", members, SmoothWeightedRoundRobin())


FACTS = ConnectionFacts(listener="l", peerHost="127.0.0.1", peerPort=5555)


def assertWithin(testCase: Any, actual: float, expected: float, delta: float) -> None:
    """
    Fail C{testCase} unless C{actual} is within C{delta} of C{expected}.

    (Trial's C{assertAlmostEqual} accepts C{delta} but ignores it.)
    """
    if not abs(actual - expected) <= delta:
        testCase.fail(f"{actual!r} is not within {delta!r} of {expected!r}")


def _address(index: int) -> str:
    """
    Client address number C{index}: distinct for distinct indexes.
    """
    return f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"


def _spread(count: int) -> list[str]:
    """
    C{count} distinct client addresses.
    """
    return [_address(i) for i in range(count)]


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
        picks = [_picked(pool, FACTS).port for _ in range(6)]
        self.assertEqual(picks, [9000, 9001] * 3)

    def test_smoothInterleaving(self) -> None:
        """
        When weights are 5, 1, 1, the heavy member's picks are interleaved
        with the others rather than given in one run.
        """
        pool = _pool(5, 1, 1)
        picks = [_picked(pool, FACTS).port - 9000 for _ in range(7)]
        self.assertEqual(picks, [0, 0, 1, 0, 2, 0, 0])

    def test_weightsRespected(self) -> None:
        """
        When weights are 1:3, 10,000 picks split 25%/75% within 2 points.
        """
        pool = _pool(1, 3)
        counts = Counter(_picked(pool, FACTS).port for _ in range(10000))
        assertWithin(self, counts[9000] / 10000, 0.25, 0.02)
        assertWithin(self, counts[9001] / 10000, 0.75, 0.02)

    def test_zeroWeightNeverPicked(self) -> None:
        """
        When a member has weight 0, it is never picked.
        """
        pool = _pool(0, 1)
        self.assertEqual({_picked(pool, FACTS).port for _ in range(10)}, {9001})

    def test_excludedSkipped(self) -> None:
        """
        When a member is excluded (already tried), the other one is picked,
        and when every member is excluded there is no pick.
        """
        pool = _pool(1, 1)
        first = pool.members[0]
        self.assertEqual({_picked(pool, FACTS, [first]).port for _ in range(4)}, {9001})
        self.assertIsNone(pool.pick(FACTS, pool.members))

    def test_unavailableSkipped(self) -> None:
        """
        When a member is unhealthy or draining, it is not picked.
        """
        pool = _pool(1, 1, 1)
        pool.members[0].healthy = False
        pool.members[1].draining = True
        self.assertEqual({_picked(pool, FACTS).port for _ in range(4)}, {9002})

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

        @implementer(IBackendSelector)
        class Raising:
            def pick(self, candidates, facts):
                raise ValueError("boom")

        @implementer(IBackendSelector)
        class Foreign:
            def pick(self, candidates, facts):
                return Member(_MemberConfig("other", 2))

        members = [Member(_MemberConfig("h", 1))]
        self.assertIsNone(Pool("p", members, Raising()).pick(FACTS))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIsNone(Pool("p", members, Foreign()).pick(FACTS))


class BuiltinSelectorTests(SynchronousTestCase):
    """
    Tests that apply to every built-in selector plugin.
    """

    def test_builtinsProvideInterfaces(self) -> None:
        """
        When each built-in factory and a selector it makes are checked with
        verifyObject, they provide their interfaces, and the factory
        provides IPlugin so the plugin scan sees it.
        """
        self.assertEqual(
            sorted(BUILTIN_SELECTORS),
            [
                "client_identity_hash",
                "least_connections",
                "random_two_choices",
                "round_robin",
                "source_ip_hash",
            ],
        )
        for name, factory in BUILTIN_SELECTORS.items():
            self.assertEqual(factory.name, name)
            self.assertTrue(IPlugin.providedBy(factory), name)
            self.assertTrue(verifyObject(IBackendSelectorFactory, factory), name)
            self.assertTrue(verifyObject(IBackendSelector, factory.newSelector()), name)

    def test_builtinsPassPluginCheck(self) -> None:
        """
        When each built-in factory goes through the check offered to plugin
        authors, it passes, and every call makes a fresh selector.
        """
        for factory in BUILTIN_SELECTORS.values():
            selector = verifySelectorPlugin(factory)
            self.assertIsNot(selector, factory.newSelector())

    def test_oneCandidateChosen(self) -> None:
        """
        When there is exactly one candidate, every built-in selector picks it.
        """
        pool = fakePool(5)
        for factory in BUILTIN_SELECTORS.values():
            counts = pickMany(factory.newSelector(), pool, connectionFacts(), 10)
            self.assertEqual(counts, Counter({pool[0]: 10}), factory.name)


class WeightedSplitTests(SynchronousTestCase):
    """
    Weights 1:3 split 10,000 picks 25%/75% within 2 points for the
    selectors that balance load.
    """

    def assertSplit(self, counts: Counter, pool: FakePool) -> None:
        total = sum(counts.values())
        self.assertEqual(total, 10000)
        assertWithin(self, counts[pool[0]] / total, 0.25, 0.02)
        assertWithin(self, counts[pool[1]] / total, 0.75, 0.02)

    def test_roundRobin(self) -> None:
        """
        When round_robin picks 10,000 times among weights 1:3, the split is
        25%/75%.
        """
        pool = fakePool(1, 3)
        self.assertSplit(pickMany(SmoothWeightedRoundRobin(), pool, n=10000), pool)

    def test_leastConnectionsWithClosingConnections(self) -> None:
        """
        When least_connections picks 10,000 times among weights 1:3 and each
        connection stays open for a random 1 to 200 further picks, the split
        is 25%/75%, and every connection is closed at the end.
        """
        pool = fakePool(1, 3)
        rng = Random(1)
        counts = pickMany(
            LeastConnections(), pool, n=10000, holdFor=lambda: rng.randint(1, 200)
        )
        self.assertSplit(counts, pool)
        self.assertEqual([m.activeConnections for m in pool], [0, 0])

    def test_randomTwoChoicesWithClosingConnections(self) -> None:
        """
        When random_two_choices picks 10,000 times among weights 1:3 and each
        connection stays open for a random 1 to 200 further picks, the split
        is 25%/75%.
        """
        pool = fakePool(1, 3)
        rng = Random(2)
        counts = pickMany(
            RandomTwoChoices(Random(3)), pool, n=10000, holdFor=lambda: rng.randint(1, 200)
        )
        self.assertSplit(counts, pool)

    def test_randomTwoChoicesIdle(self) -> None:
        """
        When random_two_choices picks 10,000 times among idle members with
        weights 1:3 (nothing tells them apart but the weighted draw), the
        split is 25%/75%.
        """
        pool = fakePool(1, 3)
        self.assertSplit(pickMany(RandomTwoChoices(Random(4)), pool, n=10000), pool)


class LeastConnectionsTests(SynchronousTestCase):
    """
    Tests for L{LeastConnections}.
    """

    def test_prefersIdleMember(self) -> None:
        """
        When one member is idle and the others carry connections, the idle
        one is picked.
        """
        pool = fakePool(1, 1, 1)
        pool[0].activeConnections = 3
        pool[2].activeConnections = 2
        self.assertIs(LeastConnections().pick(pool.candidates(), connectionFacts()), pool[1])

    def test_idleMembersAlternate(self) -> None:
        """
        When members of equal weight stay idle (connections close before
        the next pick), picks go round them in turn.
        """
        pool = fakePool(1, 1, 1)
        selector = LeastConnections()
        picks = [selector.pick(pool.candidates(), connectionFacts()) for _ in range(6)]
        self.assertEqual(picks, [pool[0], pool[1], pool[2]] * 2)

    def test_loadPerWeight(self) -> None:
        """
        When members differ in weight, the one with the lowest
        C{(activeConnections + 1) / weight} is picked: 4 connections on
        weight 3 (5/3) beat 1 connection on weight 1 (2/1).
        """
        pool = fakePool(1, 3)
        pool[0].activeConnections = 1
        pool[1].activeConnections = 4
        self.assertIs(LeastConnections().pick(pool.candidates(), connectionFacts()), pool[1])
        pool[1].activeConnections = 5
        self.assertIs(LeastConnections().pick(pool.candidates(), connectionFacts()), pool[0])

    def test_heavierMemberFirstWhenIdle(self) -> None:
        """
        When idle members have weights 1 and 3 and connections stay open,
        the heavier one takes three connections for the lighter one's one.
        """
        pool = fakePool(1, 3)
        counts = pickMany(LeastConnections(), pool, n=8, holdFor=100)
        self.assertEqual((counts[pool[0]], counts[pool[1]]), (2, 6))

    def test_retryTakesAnother(self) -> None:
        """
        When the chosen member is excluded for a retry, the pool offers the
        others and the least loaded of them is picked.
        """
        pool = _pool(1, 1, 1)
        pool.selector = LeastConnections()
        pool.members[2].activeConnections = 1
        first = _picked(pool, FACTS)
        self.assertIn(first, pool.members[:2])
        second = _picked(pool, FACTS, [first])
        self.assertIn(second, pool.members[:2])
        self.assertIsNot(first, second)


class RandomTwoChoicesTests(SynchronousTestCase):
    """
    Tests for L{RandomTwoChoices}.
    """

    def test_lessLoadedOfTheTwo(self) -> None:
        """
        When there are two candidates (so both are always drawn), the one
        with fewer connections per weight is always picked.
        """
        pool = fakePool(1, 1)
        pool[0].activeConnections = 5
        counts = pickMany(RandomTwoChoices(Random(0)), pool, n=200)
        self.assertEqual(counts, Counter({pool[1]: 200}))

    def test_busiestNeverPicked(self) -> None:
        """
        When one member carries more connections per weight than all the
        others, it is never picked (any pair containing it has a better
        member), while the others are.
        """
        pool = fakePool(1, 1, 1, 1)
        for member, load in zip(pool, [0, 1, 9, 2]):
            member.activeConnections = load
        counts = pickMany(RandomTwoChoices(Random(0)), pool, n=1000)
        self.assertEqual(counts[pool[2]], 0)
        self.assertEqual({pool[0], pool[1], pool[3]}, set(counts))

    def test_drawsAreDistinct(self) -> None:
        """
        When the two draws would both land on one member, the second one is
        taken from the others: a heavily weighted busy member still loses to
        an idle light one every time.
        """
        pool = fakePool(1000, 1)
        pool[0].activeConnections = 1
        counts = pickMany(RandomTwoChoices(Random(0)), pool, n=500)
        self.assertEqual(counts, Counter({pool[1]: 500}))

    def test_seededIsReproducible(self) -> None:
        """
        When two selectors are given equally seeded random sources, they
        pick the same sequence.
        """
        pool = fakePool(1, 2, 3, 4, 5)
        first = RandomTwoChoices(Random(42))
        second = RandomTwoChoices(Random(42))
        facts = connectionFacts()
        self.assertEqual(
            [first.pick(pool.candidates(), facts) for _ in range(50)],
            [second.pick(pool.candidates(), facts) for _ in range(50)],
        )

    def test_defaultRandom(self) -> None:
        """
        When no random source is given, each selector gets its own
        L{Random}.
        """
        self.assertIsInstance(RandomTwoChoices().random, Random)
        self.assertIsNot(RandomTwoChoices().random, RandomTwoChoices().random)


class ConsistentHashMixin:
    """
    Tests shared by the consistent-hash selectors: remapping when members
    come and go, weights, fallback to the next member.
    """

    selectorClass: Callable[[], Any]

    def factsFor(self, index: int) -> ConnectionFacts:
        """
        The facts of client number C{index}; distinct clients, distinct keys.
        """
        raise NotImplementedError()

    def assignments(self, selector: Any, pool: Any, count: int = 10000) -> list[Any]:
        return [selector.pick(pool.candidates(), self.factsFor(i)) for i in range(count)]

    def test_sameKeySameMember(self: Any) -> None:
        """
        When one client connects again, to the same selector or to a new
        one (another proxy process), it gets the same member, whatever the
        order of the candidates.
        """
        pool = fakePool(1, 1, 1, 1, 1)
        first = self.assignments(self.selectorClass(), pool, 500)
        self.assertEqual(self.assignments(self.selectorClass(), pool, 500), first)
        reordered = FakePool(list(reversed(pool.members)))
        self.assertEqual(self.assignments(self.selectorClass(), reordered, 500), first)

    def test_keysSpread(self: Any) -> None:
        """
        When 10,000 clients connect to five equal members, each member gets
        a fifth of them within 2 points.
        """
        pool = fakePool(1, 1, 1, 1, 1)
        counts = Counter(self.assignments(self.selectorClass(), pool))
        for member in pool:
            assertWithin(self, counts[member] / 10000, 0.2, 0.02)

    def test_removingMemberMovesOnlyItsKeys(self: Any) -> None:
        """
        When one of five members is removed, only the clients that were on
        it move (about a fifth of them), and they spread over the others.
        """
        pool = fakePool(1, 1, 1, 1, 1)
        selector = self.selectorClass()
        before = self.assignments(selector, pool)
        removed = pool[2]
        pool.remove(removed)
        after = self.assignments(selector, pool)
        moved = [i for i in range(10000) if before[i] is not after[i]]
        self.assertTrue(all(before[i] is removed for i in moved))
        self.assertEqual(len(moved), before.count(removed))
        self.assertTrue(0.15 <= len(moved) / 10000 <= 0.25, len(moved))
        self.assertEqual({after[i] for i in moved}, set(pool))

    def test_addingMemberTakesOnlyItsShare(self: Any) -> None:
        """
        When a sixth member is added to five, about a sixth of the clients
        move, all of them to the new member.
        """
        pool = fakePool(1, 1, 1, 1, 1)
        selector = self.selectorClass()
        before = self.assignments(selector, pool)
        added = pool.add()
        after = self.assignments(selector, pool)
        moved = [i for i in range(10000) if before[i] is not after[i]]
        self.assertEqual({after[i] for i in moved}, {added})
        self.assertTrue(0.12 <= len(moved) / 10000 <= 0.22, len(moved))

    def test_weightsSkewProportionally(self: Any) -> None:
        """
        When members have weights 1, 2, 3 and 4, they get 10%, 20%, 30% and
        40% of 10,000 clients, within 2 points.
        """
        pool = fakePool(1, 2, 3, 4)
        counts = Counter(self.assignments(self.selectorClass(), pool))
        for member in pool:
            assertWithin(self, counts[member] / 10000, member.weight / 10, 0.02)

    def test_unavailableMemberFallsToNext(self: Any) -> None:
        """
        When a client's member becomes unhealthy, or was already tried for
        this connection, the pool offers the others and the client goes to
        its second choice, the same in both cases; when the member is
        healthy again, the client comes back to it.
        """
        pool = _pool(1, 1, 1, 1)
        pool.selector = self.selectorClass()
        facts = self.factsFor(7)
        usual = _picked(pool, facts)
        retry = _picked(pool, facts, [usual])
        self.assertIsNot(retry, usual)
        usual.healthy = False
        self.assertIs(pool.pick(facts), retry)
        usual.healthy = True
        self.assertIs(pool.pick(facts), usual)


class SourceIPHashTests(ConsistentHashMixin, SynchronousTestCase):
    """
    Tests for L{SourceIPHash}.
    """

    selectorClass = SourceIPHash

    def factsFor(self, index: int) -> ConnectionFacts:
        return connectionFacts(peerHost=_address(index), peerPort=40000 + index % 1000)

    def test_sourcePortIgnored(self) -> None:
        """
        When one client address connects from different source ports, it
        gets the same member.
        """
        pool = fakePool(1, 1, 1, 1, 1)
        selector = SourceIPHash()
        picks = {
            selector.pick(pool.candidates(), connectionFacts("192.0.2.200", port))
            for port in range(40000, 40100)
        }
        self.assertEqual(len(picks), 1)

    def test_ipv4MappedIsIPv4(self) -> None:
        """
        When an IPv4 client arrives on a dual-stack listener as an
        IPv4-mapped IPv6 address, or an IPv6 address is spelled
        differently, it is the same key as the plain form.
        """
        self.assertEqual(
            sourceAddressKey(connectionFacts("::ffff:192.0.2.7")),
            sourceAddressKey(connectionFacts("192.0.2.7")),
        )
        self.assertEqual(
            sourceAddressKey(connectionFacts("2001:DB8:0:0::1")),
            sourceAddressKey(connectionFacts("2001:db8::1")),
        )
        self.assertNotEqual(
            sourceAddressKey(connectionFacts("192.0.2.7")),
            sourceAddressKey(connectionFacts("192.0.2.8")),
        )

    def test_notAnAddress(self) -> None:
        """
        When the peer is not an IP address (a UNIX socket), its text is the
        key and a member is still picked.
        """
        pool = fakePool(1, 1)
        facts = connectionFacts(peerHost="/run/mtlsproxy.sock")
        self.assertIn(SourceIPHash().pick(pool.candidates(), facts), pool.members)


class ClientIdentityHashTests(ConsistentHashMixin, SynchronousTestCase):
    """
    Tests for L{ClientIdentityHash}.
    """

    selectorClass = ClientIdentityHash

    def factsFor(self, index: int) -> ConnectionFacts:
        # The address changes with every connection: only the identity counts.
        return connectionFacts(
            peerHost=f"198.51.100.{index % 250}", clientSubject=f"CN=client-{index},O=Example"
        )

    def test_renewedCertificateStays(self) -> None:
        """
        When clients come back with renewed certificates (new serial and
        fingerprint, same subject and issuer), from other addresses, each
        gets the member it had.
        """
        pool = fakePool(1, 1, 1, 1, 1)
        selector = ClientIdentityHash()
        for index in range(1000):
            subject = f"CN=client-{index},O=Example"
            old = connectionFacts(peerHost="203.0.113.1", clientSubject=subject, clientSerial=1)
            new = connectionFacts(peerHost="203.0.113.2", clientSubject=subject, clientSerial=2)
            self.assertNotEqual(
                old.clientIdentity.fingerprint, new.clientIdentity.fingerprint
            )
            self.assertIs(
                selector.pick(pool.candidates(), new), selector.pick(pool.candidates(), old)
            )

    def test_issuerIsPartOfIdentity(self) -> None:
        """
        When two certificates have the same subject but different issuers,
        they are different keys.
        """
        self.assertNotEqual(
            clientIdentityKey(connectionFacts(clientSubject="CN=a", clientIssuer="CN=CA 1")),
            clientIdentityKey(connectionFacts(clientSubject="CN=a", clientIssuer="CN=CA 2")),
        )

    def test_noCertificateUsesAddress(self) -> None:
        """
        When a client presents no certificate, it is placed by its address,
        exactly as source_ip_hash would place it.
        """
        pool = fakePool(1, 2, 1, 3)
        byIdentity = ClientIdentityHash()
        byAddress = SourceIPHash()
        for host in _spread(1000):
            facts = connectionFacts(peerHost=host)
            self.assertIsNone(facts.clientIdentity)
            self.assertIs(
                byIdentity.pick(pool.candidates(), facts),
                byAddress.pick(pool.candidates(), facts),
            )

    def test_emptySubjectUsesFingerprint(self) -> None:
        """
        When a certificate has an empty subject, it is keyed by its
        fingerprint, so such clients are still told apart.
        """
        first = connectionFacts(clientSubject="", clientFingerprint="AB" * 32)
        second = connectionFacts(clientSubject="", clientFingerprint="cd" * 32)
        self.assertEqual(
            clientIdentityKey(first),
            clientIdentityKey(connectionFacts(clientSubject="", clientFingerprint="ab" * 32)),
        )
        self.assertNotEqual(clientIdentityKey(first), clientIdentityKey(second))


class HashingTests(SynchronousTestCase):
    """
    Tests for L{mtlsproxy.hashing}.
    """

    def test_scoresAreStable(self) -> None:
        """
        When a score is computed, it is the value this release has always
        computed: a change would move every client to another member on
        upgrade, so it must be deliberate (bump the hash's version).
        """
        key = peerAddressKey("192.0.2.77")
        self.assertEqual(key.hex(), "00000004706565720000000a3139322e302e322e3737")
        self.assertEqual(score(key, encodeParts("10.0.0.1", "443"), 1), 0.48511285216492556)
        self.assertEqual(score(key, encodeParts("10.0.0.2", "443"), 3), 14.931484345157287)

    def test_unitIntervalIsOpen(self) -> None:
        """
        When the hash is all zero bits or all one bits, it still maps
        strictly inside (0, 1), so the score's logarithm is finite.
        """
        low = unitInterval(bytes(8))
        high = unitInterval(b"\xff" * 8)
        self.assertTrue(0 < low < high < 1)

    def test_encodingIsUnambiguous(self) -> None:
        """
        When fields are split differently, their encodings differ.
        """
        self.assertNotEqual(encodeParts("ab", "c"), encodeParts("a", "bc"))

    def test_scoreAgreesWithSelection(self) -> None:
        """
        When a member is chosen for a key, it is the one with the highest
        L{score}.
        """
        pool = fakePool(1, 2, 3)
        for host in _spread(100):
            key = peerAddressKey(host)
            best = max(pool, key=lambda m: score(key, memberIdentity(m), m.weight))
            self.assertIs(highestRandomWeight(key, pool.candidates()), best)
        self.assertIsNone(highestRandomWeight(b"k", []))
