# -*- test-case-name: tests.test_selectors -*-
"""
The built-in backend selectors: where a backend is chosen.

Each selector class provides L{IBackendSelector}; each module-level factory
(L{roundRobin}, L{leastConnections}, L{randomTwoChoices}, L{sourceIPHash},
L{clientIdentityHash}) provides L{IBackendSelectorFactory} and
L{twisted.plugin.IPlugin} and is declared in
C{twisted/plugins/mtlsproxy_plugin.py}, which is how
L{mtlsproxy.plugins.selectorFactory} finds it by name.

This module is imported by Twisted's plugin scan, so it imports nothing heavy
and never the reactor.

All selectors are given only candidates that may be chosen now (healthy, not
drained, weight above zero, not already tried for this connection; see
L{mtlsproxy.pool.Pool.candidates}), never an empty list.
"""

from __future__ import annotations

from random import Random
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from .hashing import encodeParts, highestRandomWeight, peerAddressKey
from .interfaces import IBackendSelector, IBackendSelectorFactory, IMemberState


@implementer(IBackendSelector)
class SmoothWeightedRoundRobin:
    """
    Weighted round robin that interleaves members (nginx's "smooth" variant).

    With weights 5, 1, 1 it yields a, a, b, a, c, a, a rather than a run of
    five a's: every pick adds each candidate's weight to its running score,
    picks the highest score and subtracts the candidates' total weight from
    the winner.  Candidates may differ from pick to pick (health changes,
    retries); scores are kept per member key.
    """

    def __init__(self) -> None:
        self._scores: dict[Any, int] = {}

    def pick(self, candidates: Sequence[IMemberState], facts: Any) -> Optional[IMemberState]:
        """
        Choose the candidate with the highest running score.
        """
        total = 0
        best: Optional[IMemberState] = None
        bestScore = 0
        scores = self._scores
        for member in candidates:
            weight = member.weight
            score = scores.get(member.key, 0) + weight
            scores[member.key] = score
            total += weight
            if best is None or score > bestScore:
                best, bestScore = member, score
        if best is not None:
            scores[best.key] = bestScore - total
        return best


@implementer(IBackendSelector)
class LeastConnections:
    """
    Weighted least connections.

    Picks the candidate that would be least loaded after taking the new
    connection: the lowest C{(activeConnections + 1) / weight}.  Counting the
    new connection makes weights matter for idle members too: with weights 1
    and 3, the heavier member takes three connections before the lighter one
    takes its first.

    Ties are broken round robin: each pick starts looking after the position
    of the previous winner, so idle members of equal weight alternate
    instead of the first one taking every connection that closes quickly.
    """

    def __init__(self) -> None:
        self._start = 0

    def pick(self, candidates: Sequence[IMemberState], facts: Any) -> Optional[IMemberState]:
        """
        Choose the candidate with the lowest connections per weight.
        """
        count = len(candidates)
        if not count:
            return None
        start = self._start % count
        bestIndex = start
        best = candidates[start]
        bestLoad, bestWeight = best.activeConnections + 1, best.weight
        for offset in range(1, count):
            index = (start + offset) % count
            member = candidates[index]
            load, weight = member.activeConnections + 1, member.weight
            # load / weight < bestLoad / bestWeight, exactly, in integers.
            if load * bestWeight < bestLoad * weight:
                best, bestIndex, bestLoad, bestWeight = member, index, load, weight
        self._start = bestIndex + 1
        return best


@implementer(IBackendSelector)
class RandomTwoChoices:
    """
    The power of two random choices, weighted.

    Draws two distinct candidates at random, each with probability
    proportional to its weight, and takes the one with fewer active
    connections per unit of weight; on a tie, the first one drawn.  This
    spreads load almost as well as least connections while being
    independent of pick order, so several proxy instances sharing the same
    backends do not all rush to the same idle member.

    @ivar random: The source of randomness.
    """

    def __init__(self, random: Optional[Random] = None) -> None:
        """
        @param random: The source of randomness; a fresh, OS-seeded
            L{random.Random} if not given.  Tests pass a seeded one.
        """
        self.random = random if random is not None else Random()

    def _draw(self, candidates: Sequence[IMemberState], total: int, skip: int) -> int:
        """
        The index of one candidate drawn with probability proportional to its
        weight, never C{skip}.

        @param total: The sum of the weights of the candidates other than
            C{skip}.
        """
        threshold = self.random.random() * total
        last = -1
        for index, member in enumerate(candidates):
            if index == skip:
                continue
            last = index
            threshold -= member.weight
            if threshold < 0:
                return index
        # Rounding left a sliver at the end; it belongs to the last one.
        return last

    def pick(self, candidates: Sequence[IMemberState], facts: Any) -> Optional[IMemberState]:
        """
        Choose the less loaded (per weight) of two weighted random draws.
        """
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        total = sum(member.weight for member in candidates)
        firstIndex = self._draw(candidates, total, -1)
        first = candidates[firstIndex]
        second = candidates[self._draw(candidates, total - first.weight, firstIndex)]
        # second.active / second.weight < first.active / first.weight
        if second.activeConnections * first.weight < first.activeConnections * second.weight:
            return second
        return first


@implementer(IBackendSelector)
class RendezvousHash:
    """
    Consistent hashing: the same key goes to the same member while that
    member is a candidate.

    Uses weighted rendezvous hashing (L{mtlsproxy.hashing}): adding or
    removing one of N members moves about 1/N of the keys, and only the keys
    that go to or come from that member.  When the usual member of a key is
    not a candidate (unhealthy, drained, or already tried for this
    connection) the key goes to its second choice, and comes back when the
    member does.

    @ivar keyFor: Computes the hash key (bytes) from the connection facts.
    """

    def __init__(self, keyFor: Callable[[Any], bytes]) -> None:
        self.keyFor = keyFor

    def pick(self, candidates: Sequence[IMemberState], facts: Any) -> Optional[IMemberState]:
        """
        Choose the candidate with the highest rendezvous score for this
        connection's key.
        """
        return highestRandomWeight(self.keyFor(facts), candidates)


def sourceAddressKey(facts: Any) -> bytes:
    """
    The hash key of C{source_ip_hash}: the client's IP address
    (C{facts.peerHost}), normalised so that an IPv4-mapped IPv6 address is
    the same key as the IPv4 address (L{mtlsproxy.hashing.peerAddressKey}).

    @param facts: A L{mtlsproxy.pool.ConnectionFacts}.
    """
    return peerAddressKey(facts.peerHost)


def clientIdentityKey(facts: Any) -> bytes:
    """
    The hash key of C{client_identity_hash}: who the verified client
    certificate says the client is.

      - The key is the certificate's subject and issuer (RFC 4514 strings),
        not its fingerprint or serial number, so that a renewed certificate
        (new key, serial and validity, same subject from the same CA) stays
        on the same member.  A certificate for the same subject from another
        issuing CA is another identity (it may land elsewhere).
      - A certificate with an empty subject (identity only in the subject
        alternative names) is keyed by its fingerprint, because that is all
        that tells such clients apart; it moves when it is renewed.
      - Without a client certificate (C{client_auth = "optional"}, or a TCP
        listener) the key is the client's address, exactly as
        C{source_ip_hash} computes it, so such clients are as sticky as with
        C{source_ip_hash}.

    @param facts: A L{mtlsproxy.pool.ConnectionFacts}.
    """
    identity = facts.clientIdentity
    if identity is None:
        return sourceAddressKey(facts)
    subject = str(identity.subject or "")
    issuer = str(getattr(identity, "issuer", None) or "")
    if not subject:
        return encodeParts("fingerprint", str(identity.fingerprint).lower())
    return encodeParts("identity", subject, issuer)


class SourceIPHash(RendezvousHash):
    """
    Consistent hashing on the client's IP address (see L{sourceAddressKey}).

    Clients behind one NAT address all go to one member.
    """

    def __init__(self) -> None:
        RendezvousHash.__init__(self, sourceAddressKey)


class ClientIdentityHash(RendezvousHash):
    """
    Consistent hashing on the verified client certificate's identity (see
    L{clientIdentityKey}), falling back to the client's address when there is
    no certificate.

    Keeps one client on one member across reconnections, address changes and
    certificate renewals, which suits backends that keep per-client state.
    """

    def __init__(self) -> None:
        RendezvousHash.__init__(self, clientIdentityKey)


@implementer(IPlugin, IBackendSelectorFactory)
@attrs.frozen
class SelectorFactory:
    """
    A named selector plugin made from a class (or any callable returning an
    L{IBackendSelector} provider).

    Third-party distributions may use it too, or write their own factory; a
    factory must provide both L{IBackendSelectorFactory} and
    L{twisted.plugin.IPlugin}, or the plugin scan does not see it.
    """

    name: str
    description: str
    selectorClass: Callable[[], Any]

    def newSelector(self) -> IBackendSelector:
        """
        Make a fresh selector for one pool.
        """
        return self.selectorClass()


roundRobin = SelectorFactory(
    "round_robin",
    "Smooth weighted round robin.",
    SmoothWeightedRoundRobin,
)

leastConnections = SelectorFactory(
    "least_connections",
    "Weighted least connections; ties taken in turn.",
    LeastConnections,
)

randomTwoChoices = SelectorFactory(
    "random_two_choices",
    "Two weighted random members, the less loaded one wins.",
    RandomTwoChoices,
)

sourceIPHash = SelectorFactory(
    "source_ip_hash",
    "Consistent (rendezvous) hashing on the client's IP address.",
    SourceIPHash,
)

clientIdentityHash = SelectorFactory(
    "client_identity_hash",
    "Consistent (rendezvous) hashing on the client certificate's subject and"
    " issuer; the client's address without a certificate.",
    ClientIdentityHash,
)

BUILTIN_SELECTORS: dict[str, SelectorFactory] = {
    factory.name: factory
    for factory in (
        roundRobin,
        leastConnections,
        randomTwoChoices,
        sourceIPHash,
        clientIdentityHash,
    )
}


def selectorFactories() -> dict[str, IBackendSelectorFactory]:
    """
    All selector plugins by name, as the plugin scan finds them.

    Kept for existing callers; new code calls
    L{mtlsproxy.plugins.selectorFactory} with one name, which reports
    unknown and ambiguous names properly.  Names declared by more than one
    plugin are left out here.
    """
    from .plugins import selectorFactoriesByName

    return selectorFactoriesByName()
