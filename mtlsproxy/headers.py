# -*- test-case-name: tests.test_http -*-
"""
Rewriting the headers of proxied HTTP/1.1 messages (C{https} listeners).

Pure functions over header lists as L{h11} gives them
(C{[(name, value), ...]} of L{bytes}); L{mtlsproxy.http} applies them.

Requests to a backend (L{requestHeaders}):

  - hop-by-hop headers are removed (RFC 9110 section 7.6.1): C{Connection}
    and every header it names, C{Keep-Alive}, C{TE}, C{Trailer},
    C{Transfer-Encoding}, C{Upgrade}, and every C{Proxy-*} header;
  - every client identity header (L{mtlsproxy.identity.isIdentityHeader})
    is removed, always, so that a client cannot forge one;
  - C{X-Forwarded-For} gets the client's address appended, C{Forwarded}
    (RFC 7239) an element appended, C{X-Forwarded-Proto} is set, C{Via}
    gets C{1.1 mtlsproxy} appended;
  - C{Host} and everything else is kept as it is, in order;
  - the body framing is the proxy's: C{Transfer-Encoding: chunked} for a
    body of unknown length (the client's own C{Content-Length} is then
    dropped, against request smuggling), the client's C{Content-Length}
    otherwise;
  - the identity headers of the listener's C{client_identity_headers}
    come last.

Responses to the client (L{responseHeaders}): hop-by-hop headers removed
the same way, C{Via} appended; h11 frames the body for the client.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, Iterable, Optional, Sequence

from .identity import isIdentityHeader

__all__ = [
    "HOP_BY_HOP",
    "VIA",
    "connectionTokens",
    "forwardedElement",
    "headerValue",
    "isHopByHop",
    "requestHeaders",
    "responseHeaders",
]

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP: Final = frozenset(
    [b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"]
)
"""
The hop-by-hop headers by (lower-case) name; C{Proxy-*} headers and the
ones C{Connection} names are hop-by-hop too (L{isHopByHop}).
"""

VIA: Final = b"1.1 mtlsproxy"
"""
What the proxy appends to C{Via}.
"""

_NEVER_BY_CONNECTION: Final = frozenset([b"host", b"content-length"])
"""
Headers that C{Connection} cannot make hop-by-hop: dropping them would
change the message's target or framing (a request smuggling vector).
"""

_TOKEN: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def headerValue(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> Optional[bytes]:
    """
    The value of the first header called C{name} (lower-case), or L{None}.
    """
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def connectionTokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """
    The header names listed in C{Connection} (lower-case), e.g.
    C{{b"keep-alive", b"x-foo"}} for C{Connection: keep-alive, X-Foo}.
    """
    tokens: set[bytes] = set()
    for value in _values(headers, b"connection"):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def isHopByHop(name: bytes, tokens: frozenset[bytes] = frozenset()) -> bool:
    """
    Is C{name} a hop-by-hop header, given the C{Connection} C{tokens}?
    (C{Host} and C{Content-Length} stay, whatever C{Connection} says.)
    """
    lowered = name.lower()
    if lowered in HOP_BY_HOP or lowered.startswith(b"proxy-"):
        return True
    return lowered in tokens and lowered not in _NEVER_BY_CONNECTION


def _isChunked(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(_values(headers, b"transfer-encoding"))


def _quoted(value: str) -> str:
    """
    A C{Forwarded} parameter value: a token as it is, anything else a
    quoted-string.
    """
    if _TOKEN.match(value.encode("ascii", "replace")):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwardedElement(clientHost: str, proto: str, host: Optional[bytes]) -> bytes:
    """
    One RFC 7239 C{Forwarded} element: C{for=192.0.2.7;proto=https;host=...}
    (an IPv6 client as C{for="[2001:db8::7]"}, a value that is not a token
    quoted).
    """
    try:
        ip = ipaddress.ip_address(clientHost)
        node = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    except ValueError:
        node = clientHost or "unknown"
    parts = [f"for={_quoted(node)}", f"proto={proto}"]
    if host:
        parts.append(f"host={_quoted(host.decode('latin-1'))}")
    return ";".join(parts).encode("latin-1")


def _appendTo(headers: Sequence[tuple[bytes, bytes]], name: bytes, value: bytes) -> bytes:
    """
    The existing values of C{name} joined with C{", "}, then C{value}.
    """
    existing = [v.strip() for v in _values(headers, name) if v.strip()]
    return b", ".join(existing + [value])


def requestHeaders(
    headers: Sequence[tuple[bytes, bytes]],
    clientHost: str,
    proto: str = "https",
    identity: Iterable[tuple[bytes, bytes]] = (),
    defaultHost: Optional[bytes] = None,
) -> Headers:
    """
    The headers of a request as sent to the backend (see the module
    docstring).

    @param headers: The client's headers, in order.
    @param clientHost: The client's IP address (from a PROXY header when
        the listener accepts one).
    @param proto: The scheme the client used.
    @param identity: The identity headers to add, already rendered.
    @param defaultHost: C{Host} to add when the client sent none (an
        HTTP/1.0 request): the backend is spoken to in HTTP/1.1.
    """
    tokens = connectionTokens(headers)
    chunked = _isChunked(headers)
    out: Headers = []
    for name, value in headers:
        lowered = name.lower()
        if isHopByHop(lowered, tokens) or isIdentityHeader(lowered):
            continue
        if lowered in (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via"):
            continue
        if chunked and lowered == b"content-length":
            continue
        out.append((name, value))
    host = headerValue(headers, b"host")
    if host is None and defaultHost is not None:
        out.insert(0, (b"Host", defaultHost))
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    xff = [(n, v) for n, v in headers if n.lower() == b"x-forwarded-for"]
    out.append((b"X-Forwarded-For", _appendTo(xff, b"x-forwarded-for", clientHost.encode("ascii"))))
    out.append((b"X-Forwarded-Proto", proto.encode("ascii")))
    out.append((b"Forwarded", _appendTo(headers, b"forwarded", forwardedElement(clientHost, proto, host))))
    out.append((b"Via", _appendTo(headers, b"via", VIA)))
    out.extend(identity)
    return out


def responseHeaders(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """
    The headers of a backend's response as sent to the client: hop-by-hop
    headers removed (and C{Content-Length} when the backend used chunked
    framing: h11 chooses the client's framing), C{Via} appended.
    """
    tokens = connectionTokens(headers)
    chunked = _isChunked(headers)
    out: Headers = []
    for name, value in headers:
        lowered = name.lower()
        if isHopByHop(lowered, tokens) or lowered == b"via":
            continue
        if chunked and lowered == b"content-length":
            continue
        out.append((name, value))
    out.append((b"Via", _appendTo(headers, b"via", VIA)))
    return out
