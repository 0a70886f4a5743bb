# -*- test-case-name: tests.test_selectors -*-
"""
Weighted rendezvous hashing (highest random weight), used by the hash
selectors in L{mtlsproxy.selectors}.

For a key (a client address, a certificate identity) every candidate member
gets a score computed from the key, the member's identity and its weight; the
member with the highest score wins.  Because a member's score does not
depend on the other members:

  - removing a member (it fails its health checks, it was already tried for
    this connection, it is drained) moves only the keys that were on it, each
    to the member with the next highest score;
  - adding a member moves only the keys it now wins, about C{1/N} of them;
  - changing one member's weight moves keys only to or from that member.

The score is C{-weight / ln(u)}, where C{u} is the hash of (key, member)
read as a number uniformly spread in the open interval (0, 1).  This makes
the probability that a member wins exactly its share of the total weight
(Schindelhauer and Schomaker, "Weighted Distributed Hash Tables", 2005).

The hash is BLAKE2b, not Python's C{hash()}: it is the same in every process
and every Python version, so several proxy instances with the same pool
configuration send the same client to the same member, and a restart keeps
clients where they were.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from typing import Optional, Sequence, TypeVar

from .interfaces import IMemberState

# Domain separation for the hash: a different use of BLAKE2b on the same
# bytes gives unrelated values.  Bump the version if the encoding changes,
# because that remaps every key.
_PERSON = b"mtlsproxy-hrw-1"

_MemberT = TypeVar("_MemberT", bound=IMemberState)


def encodeParts(*parts: str) -> bytes:
    """
    Encode text fields into bytes unambiguously (each one length-prefixed),
    so that C{("ab", "c")} and C{("a", "bc")} never collide.

    @param parts: The fields of a key.
    @return: The encoded key.
    """
    out = bytearray()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(4, "big")
        out += data
    return bytes(out)


def memberIdentity(member: IMemberState) -> bytes:
    """
    The bytes that identify a member to the hash: its address and port.

    The address and port are what the configuration says, so every proxy
    instance and every restart computes the same value.

    @param member: A pool member.
    @return: The encoded identity.
    """
    return encodeParts(str(member.address), str(member.port))


def peerAddressKey(host: str) -> bytes:
    """
    The hash key for a client address.

    IP addresses are normalised, so that C{"::ffff:192.0.2.7"} (an IPv4 client
    of a dual-stack listener) and C{"192.0.2.7"} are one client, and the
    spellings of one IPv6 address are one key.  Anything that is not an IP
    address (a UNIX socket path) is used as it is.

    @param host: The client's address as text.
    @return: The encoded key.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        text = host
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        text = address.compressed
    return encodeParts("peer", text)


def unitInterval(digest: bytes) -> float:
    """
    Read a hash digest as a number in the open interval (0, 1).

    Fifty-two bits are used, so the result is one of 2**52 evenly spaced
    values, each exactly representable as a float, the smallest 2**-53 and
    the largest 1 - 2**-53: never 0 and never 1, so its logarithm is finite
    and non-zero.

    @param digest: An 8-byte hash.
    @return: C{u} with C{0 < u < 1}.
    """
    value = int.from_bytes(digest[:8], "big") >> 12
    return (2 * value + 1) / 2.0**53


def score(key: bytes, member: bytes, weight: float) -> float:
    """
    The rendezvous score of one member for one key: higher wins.

    @param key: The encoded key (see L{encodeParts}, L{peerAddressKey}).
    @param member: The member's encoded identity (L{memberIdentity}).
    @param weight: The member's weight, above zero.
    @return: C{-weight / ln(u)}, a positive number.
    """
    digest = hashlib.blake2b(
        len(key).to_bytes(4, "big") + key + member, digest_size=8, person=_PERSON
    ).digest()
    return -weight / math.log(unitInterval(digest))


def highestRandomWeight(key: bytes, candidates: Sequence[_MemberT]) -> Optional[_MemberT]:
    """
    The member with the highest rendezvous score for C{key}.

    Exact ties (which need a 52-bit hash collision) are broken by member
    identity, so the result never depends on the order of C{candidates}.

    @param key: The encoded key.
    @param candidates: The members that may be chosen; weights above zero.
    @return: The winner, or L{None} if C{candidates} is empty.
    """
    prefix = hashlib.blake2b(len(key).to_bytes(4, "big") + key, digest_size=8, person=_PERSON)
    best: Optional[_MemberT] = None
    bestRank: tuple[float, bytes] = (0.0, b"")
    for member in candidates:
        identity = memberIdentity(member)
        hashed = prefix.copy()
        hashed.update(identity)
        rank = (-member.weight / math.log(unitInterval(hashed.digest())), identity)
        if best is None or rank > bestRank:
            best, bestRank = member, rank
    return best
