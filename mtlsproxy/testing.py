# -*- test-case-name: tests.test_selectors,tests.test_plugins -*-
"""
Fakes for testing mtlsproxy plugins, for mtlsproxy's own tests and for
plugin authors.

A selector can be tested in a few lines, without sockets, a reactor or a
configuration file::

    from twisted.trial.unittest import SynchronousTestCase
    from mtlsproxy.testing import connectionFacts, fakePool, pickMany

    class MySelectorTests(SynchronousTestCase):
        def test_weights(self) -> None:
            \"\"\"
            When weights are 1:3, picks split 1:3.
            \"\"\"
            pool = fakePool(1, 3)
            counts = pickMany(MySelector(), pool, connectionFacts(), 4000)
            self.assertEqual(counts[pool[0]], 1000)

L{verifySelectorPlugin} checks the whole contract of a selector plugin at
once (interfaces, name, fresh selectors, picks among candidates).

The clock for health checkers and anything else that schedules is
L{MemoryReactorClock}, re-exported from L{twisted.internet.testing}:
C{clock.advance(seconds)} runs what is due.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import attrs
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin
from zope.interface import implementer
from zope.interface.verify import verifyObject

from .interfaces import IBackendSelector, IBackendSelectorFactory, IMemberState
from .pool import ConnectionFacts

__all__ = [
    "FakeMember",
    "FakePool",
    "fakePool",
    "FakeClientIdentity",
    "connectionFacts",
    "pickMany",
    "verifySelectorPlugin",
    "MemoryReactorClock",
]


@implementer(IMemberState)
@attrs.define(eq=False)
class FakeMember:
    """
    A pool member whose state a test sets directly.

    Compared and hashed by identity, like the real L{mtlsproxy.pool.Member},
    so members can be keys of a L{Counter} or a L{dict}.

        >>> member = FakeMember("192.0.2.1", 8443, weight=2, activeConnections=5)
        >>> member.key
        ('192.0.2.1', 8443)

    @ivar address: The member's host address.
    @ivar port: The member's TCP port.
    @ivar weight: Its weight, C{>= 0} (0: never a candidate).
    @ivar activeConnections: Proxied connections open to it now.
    @ivar healthy: L{False} to take it out of the candidates.
    """

    address: str
    port: int
    weight: int = 1
    activeConnections: int = 0
    healthy: bool = True

    @property
    def key(self) -> tuple[str, int]:
        """
        C{(address, port)}, as for a real member.
        """
        return (self.address, self.port)

    def connectionOpened(self) -> None:
        """
        Count one more active connection.
        """
        self.activeConnections += 1

    def connectionClosed(self) -> None:
        """
        Count one less active connection.
        """
        if self.activeConnections <= 0:
            raise RuntimeError(f"connectionClosed without open connection on {self!r}")
        self.activeConnections -= 1


@attrs.define
class FakePool:
    """
    The members of a pool, and which of them a selector is offered.

    Indexing and iterating give all members in order;
    L{candidates} gives those a selector may be offered, by the rule of
    L{mtlsproxy.pool.Pool.candidates} (a fake member is never drained or
    ejected: set C{healthy} or C{weight} instead; failing open is not
    modelled).

        >>> pool = fakePool(1, 1, 2)
        >>> pool[0].healthy = False
        >>> [m.address for m in pool.candidates()]
        ['192.0.2.2', '192.0.2.3']

    @ivar members: All members, healthy or not, in configuration order.
    """

    members: list[FakeMember] = attrs.field(factory=list)

    def candidates(self, exclude: Iterable[IMemberState] = ()) -> list[FakeMember]:
        """
        The members a selector may choose from now: healthy, weight above
        zero, not in C{exclude} (members already tried for the connection).
        """
        excluded = {id(member) for member in exclude}
        return [
            m for m in self.members if m.healthy and m.weight > 0 and id(m) not in excluded
        ]

    def add(self, weight: int = 1, address: Optional[str] = None, port: int = 8443) -> FakeMember:
        """
        Add a member at the end and return it.

        @param address: Its address; by default the next unused one of
            C{192.0.2.1}, C{192.0.2.2}, ...
        """
        if address is None:
            used = {m.address for m in self.members}
            number = 1
            while f"192.0.2.{number}" in used:
                number += 1
            address = f"192.0.2.{number}"
        member = FakeMember(address, port, weight)
        self.members.append(member)
        return member

    def remove(self, member: FakeMember) -> None:
        """
        Take a member out of the pool (as a configuration reload would).
        """
        self.members = [m for m in self.members if m is not member]

    def __getitem__(self, index: int) -> FakeMember:
        return self.members[index]

    def __iter__(self) -> Iterator[FakeMember]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


def fakePool(*weights: int) -> FakePool:
    """
    A pool with one healthy, idle member per weight: C{192.0.2.1:8443},
    C{192.0.2.2:8443}, ... (TEST-NET-1 addresses, never reachable).

        >>> [(m.address, m.weight) for m in fakePool(1, 3)]
        [('192.0.2.1', 1), ('192.0.2.2', 3)]
    """
    pool = FakePool()
    for weight in weights:
        pool.add(weight)
    return pool


@attrs.frozen
class FakeClientIdentity:
    """
    The identity of a verified client certificate, as
    L{mtlsproxy.pool.ConnectionFacts.clientIdentity} carries it.

    @ivar subject: The subject, an RFC 4514 string (C{"CN=alice,O=Example"}).
    @ivar issuer: The issuer, an RFC 4514 string.
    @ivar serial: The serial number.
    @ivar fingerprint: The SHA-256 fingerprint in lower-case hex.  A real one
        is the hash of the certificate; by default this fake derives one
        from subject, issuer and serial, so a "renewed" certificate (another
        serial) has another fingerprint.
    """

    subject: str
    issuer: str = "CN=Example Client CA"
    serial: int = 1
    fingerprint: str = attrs.field()

    @fingerprint.default
    def _fingerprint(self) -> str:
        material = f"{self.subject}\0{self.issuer}\0{self.serial}".encode()
        return hashlib.sha256(material).hexdigest()


def connectionFacts(
    peerHost: str = "198.51.100.1",
    peerPort: int = 50000,
    sni: Optional[str] = None,
    clientSubject: Optional[str] = None,
    clientIssuer: str = "CN=Example Client CA",
    clientSerial: int = 1,
    clientFingerprint: Optional[str] = None,
    listener: str = "test",
) -> ConnectionFacts:
    """
    The facts a selector gets for one connection.

    Without C{clientSubject} the connection has no client certificate
    (C{clientIdentity} is L{None}); with it, C{clientIdentity} is a
    L{FakeClientIdentity}.

        >>> facts = connectionFacts(peerHost="203.0.113.9", clientSubject="CN=alice")
        >>> facts.clientIdentity.subject
        'CN=alice'

    @param clientSerial: The certificate's serial: change it (keeping the
        subject and issuer) to model a renewed certificate.
    @param clientFingerprint: The fingerprint; by default derived from
        subject, issuer and serial.
    """
    identity: Optional[FakeClientIdentity] = None
    if clientSubject is not None:
        if clientFingerprint is None:
            identity = FakeClientIdentity(clientSubject, clientIssuer, clientSerial)
        else:
            identity = FakeClientIdentity(
                clientSubject, clientIssuer, clientSerial, clientFingerprint
            )
    return ConnectionFacts(
        listener=listener,
        peerHost=peerHost,
        peerPort=peerPort,
        sni=sni,
        clientIdentity=identity,
    )


def pickMany(
    selector: IBackendSelector,
    candidates: Union[FakePool, Sequence[IMemberState]],
    facts: Union[ConnectionFacts, Callable[[int], ConnectionFacts], None] = None,
    n: int = 1000,
    holdFor: Union[int, Callable[[], int], None] = None,
) -> Counter[Any]:
    """
    Let C{selector} pick C{n} times and count what it picked.

        >>> from mtlsproxy.selectors import SmoothWeightedRoundRobin
        >>> pool = fakePool(1, 3)
        >>> counts = pickMany(SmoothWeightedRoundRobin(), pool, n=400)
        >>> counts[pool[0]], counts[pool[1]]
        (100, 300)

    @param candidates: A L{FakePool} (its L{FakePool.candidates} are offered
        at each pick) or a sequence of members (offered as they are).
    @param facts: The facts of every connection, or a function from the pick
        number (0 to C{n - 1}) to the facts of that connection (to spread
        keys for a hash selector); by default L{connectionFacts()}.
    @param holdFor: L{None} to open no connections (members are left as
        they are); otherwise each pick opens a connection on the chosen
        member (C{activeConnections + 1}) that stays open for this many
        further picks, or for as many as this function returns for each
        connection (say C{lambda: rng.randint(1, 200)} with a seeded
        L{random.Random}).  Connections still open at the end are closed, so
        the members end as they started.
    @return: How many times each member was picked; C{None} counts refusals.
    @raise AssertionError: If the selector returns something that is not one
        of the candidates (the real pool would refuse the connection).
    """
    if facts is None:
        facts = connectionFacts()
    factsFor: Callable[[int], ConnectionFacts]
    if isinstance(facts, ConnectionFacts):
        fixed = facts
        factsFor = lambda number: fixed  # noqa: E731
    else:
        factsFor = facts
    lifetime: Optional[Callable[[], int]]
    if holdFor is None or callable(holdFor):
        lifetime = holdFor
    else:
        fixedLifetime = holdFor
        lifetime = lambda: fixedLifetime  # noqa: E731

    # Without mypy-zope, mypy reads interface methods as lacking "self".
    picker: Any = selector
    counts: Counter[Any] = Counter()
    # Pick number at which connections close -> the members they are on.
    closing: dict[int, list[Any]] = {}
    try:
        for number in range(n):
            for member in closing.pop(number, ()):
                _close(member)
            offered = (
                candidates.candidates() if isinstance(candidates, FakePool) else list(candidates)
            )
            chosen = picker.pick(offered, factsFor(number))
            if chosen is not None and not any(chosen is c for c in offered):
                raise AssertionError(
                    f"{selector!r} returned {chosen!r}, which is not one of the"
                    f" candidates {offered!r}"
                )
            counts[chosen] += 1
            if chosen is not None and lifetime is not None:
                _open(chosen)
                closing.setdefault(number + 1 + max(0, lifetime()), []).append(chosen)
    finally:
        for members in closing.values():
            for member in members:
                _close(member)
    return counts


def _open(member: Any) -> None:
    opened = getattr(member, "connectionOpened", None)
    if opened is not None:
        opened()
    else:
        member.activeConnections += 1


def _close(member: Any) -> None:
    closed = getattr(member, "connectionClosed", None)
    if closed is not None:
        closed()
    else:
        member.activeConnections -= 1


def verifySelectorPlugin(factory: object) -> IBackendSelector:
    """
    Check what mtlsproxy needs of a selector plugin, and return a fresh
    selector from it.

    The factory must provide L{twisted.plugin.IPlugin} (or the plugin scan
    does not see it) and L{IBackendSelectorFactory}, have a non-empty C{str}
    C{name} and a C{str} C{description}; C{newSelector()} must return a new
    L{IBackendSelector} provider each time, which, for pools of one, two
    and five members, with and without a client certificate, returns one of
    the candidates or L{None}.

        >>> from mtlsproxy.selectors import leastConnections
        >>> selector = verifySelectorPlugin(leastConnections)

    @raise AssertionError: If a check fails.
    @raise zope.interface.Invalid: If an interface is not provided fully.
    """
    if not IPlugin.providedBy(factory):
        raise AssertionError(f"{factory!r} does not provide twisted.plugin.IPlugin")
    verifyObject(IBackendSelectorFactory, factory)
    name = getattr(factory, "name")
    if not isinstance(name, str) or not name:
        raise AssertionError(f"{factory!r} has name {name!r}, not a non-empty str")
    description = getattr(factory, "description")
    if not isinstance(description, str):
        raise AssertionError(f"{factory!r} has description {description!r}, not a str")
    selector = factory.newSelector()  # type: ignore[attr-defined]
    other = factory.newSelector()  # type: ignore[attr-defined]
    if selector is other:
        raise AssertionError(f"{factory!r}.newSelector() returned the same object twice")
    verifyObject(IBackendSelector, selector)
    for weights in [(1,), (1, 1), (1, 2, 3, 1, 5)]:
        pool = fakePool(*weights)
        for facts in (connectionFacts(), connectionFacts(clientSubject="CN=alice")):
            pickMany(selector, pool, facts, 20)
    return selector
