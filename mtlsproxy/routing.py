# -*- test-case-name: tests.test_routing -*-
"""
Where a connection or a request goes: a listener's C{[[listeners.routes]]}.

A listener sends everything to its C{pool} unless one of its routes
matches.  Routes are tried in the order of the file, as an Ingress tries
its rules, and the first whose conditions all hold wins:

  - C{host}: the request's C{Host} (C{https} listeners), exact
    (C{"api.example.com"}) or a wildcard for one DNS label
    (C{"*.example.com"} matches C{a.example.com}, not C{example.com} nor
    C{a.b.example.com}), case-insensitive, port ignored;
  - C{path_prefix}: the request path (C{https} listeners) starts with these
    path segments: C{"/v1"} and C{"/v1/"} both match C{/v1}, C{/v1/} and
    C{/v1/users}, not C{/v10} (a trailing slash is not significant, as in
    an Ingress C{Prefix} path);
  - C{sni}: the server name the client asked for in its TLS ClientHello,
    same syntax as C{host} (C{tls} and C{https} listeners).

A C{tls} listener chooses its pool once per connection, when the handshake
is complete (see L{mtlsproxy.relay}); an C{https} listener once per request.

Routing decides where traffic goes, not who may send it: the path is
matched as sent (no percent-decoding or dot-segment removal), so it is not
an access control.

The run-time result is a L{RouteTarget}: the L{Pool} and the settings of
the pool that apply to one backend connection.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import attrs

if TYPE_CHECKING:
    from .pool import ConnectionFacts, Pool

__all__ = [
    "Route",
    "RouteTarget",
    "Router",
    "hostMatches",
    "hostOfAuthority",
    "hostPatternProblem",
    "pathOfTarget",
    "pathPrefixMatches",
    "pathPrefixProblem",
]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def hostPatternProblem(pattern: object) -> Optional[str]:
    """
    Check a C{host} or C{sni} pattern of a route.

    @return: L{None} if C{pattern} is a host name (C{"api.example.com"}) or
        a one-label wildcard (C{"*.example.com"}), otherwise what is wrong.
    """
    if not isinstance(pattern, str) or not pattern:
        return "expected a host name such as \"api.example.com\" or \"*.example.com\""
    name = pattern.lower()
    if name.startswith("*."):
        name = name[2:]
    labels = name.split(".")
    if "*" in name or not all(_LABEL.match(label) for label in labels):
        return (
            f"expected a host name such as \"api.example.com\" or a wildcard for"
            f" one label such as \"*.example.com\"; got {pattern!r}"
        )
    return None


def pathPrefixProblem(prefix: object) -> Optional[str]:
    """
    Check a C{path_prefix} of a route.

    @return: L{None} if C{prefix} is a path starting with C{/} without
        query, fragment, spaces or control characters, otherwise what is
        wrong.
    """
    if (
        not isinstance(prefix, str)
        or not prefix.startswith("/")
        or any(c in prefix for c in "?# ")
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in prefix)
    ):
        return f"expected a path starting with \"/\" (no query, no spaces) such as \"/v1/\"; got {prefix!r}"
    return None


def hostOfAuthority(authority: Optional[str]) -> Optional[str]:
    """
    The host name of a C{Host} header value or an SNI name, for matching:
    lower-case, without port, without a trailing dot; an IPv6 literal
    without its brackets.

    @return: L{None} for L{None} or an empty value.
    """
    if not authority:
        return None
    host = authority.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    return host or None


def hostMatches(pattern: str, host: Optional[str]) -> bool:
    """
    Does C{host} (from L{hostOfAuthority}) match a route's C{host} or
    C{sni} pattern?  A wildcard C{*.example.com} stands for exactly one
    label.
    """
    if host is None:
        return False
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def pathOfTarget(target: str) -> str:
    """
    The path of a request target: origin-form (C{/a/b?q}) without its
    query, the path of an absolute-form target
    (C{https://h/a/b?q} gives C{/a/b}), C{"*"} for asterisk-form.
    """
    if not target.startswith("/") and "://" in target:
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    for separator in "?#":
        target = target.split(separator, 1)[0]
    return target


def pathPrefixMatches(prefix: str, path: str) -> bool:
    """
    Does C{path} start with the path segments of C{prefix}?  C{"/v1"} and
    C{"/v1/"} match C{/v1}, C{/v1/} and C{/v1/x}, not C{/v10}; C{"/"}
    matches every path.
    """
    stem = prefix.rstrip("/")
    if not stem:
        return path.startswith("/")
    return path == stem or path.startswith(stem + "/")


@attrs.frozen
class RouteTarget:
    """
    Where one connection (C{tls}, C{tcp}) or request (C{https}) goes.

    @ivar pool: The run-time pool members are picked from.
    @ivar connectTimeout: Seconds allowed for one backend connection
        attempt (the pool's C{connect_timeout}).
    @ivar maxAttempts: Backend connection attempts (the pool's
        C{max_connect_attempts}).
    @ivar proxyProtocol: The pool's C{proxy_protocol}: C{"none"}, C{"v1"}
        or C{"v2"}: the header written first on every backend connection.
    @ivar proxyProtocolCertificate: The pool's
        C{proxy_protocol_certificate}: add the client certificate (DER) in
        TLV C{0xE0} of a v2 header.
    @ivar backendTLS: The pool's backend TLS settings (with C{wrapFactory}),
        or L{None}.
    """

    pool: Pool
    connectTimeout: float
    maxAttempts: int
    proxyProtocol: str = "none"
    proxyProtocolCertificate: bool = False
    backendTLS: Any = None

    @classmethod
    def fromConfig(cls, pool: Pool, config: Any, backendTLS: Any = None) -> RouteTarget:
        """
        The target for a run-time pool and its L{mtlsproxy.config.PoolConfig}.

        @param backendTLS: The pool's L{mtlsproxy.backendtls.BackendTLS}
            (C{[pools.tls]}), or L{None} for plain TCP to its members.
        """
        return cls(
            pool=pool,
            connectTimeout=config.connect_timeout,
            maxAttempts=config.max_connect_attempts,
            proxyProtocol=getattr(config, "proxy_protocol", "none"),
            proxyProtocolCertificate=getattr(config, "proxy_protocol_certificate", False),
            backendTLS=backendTLS,
        )

    def preamble(self, clientTransport: Any) -> bytes:
        """
        The bytes to write to a new backend connection before anything
        else: the PROXY protocol header describing the client connection
        C{clientTransport}, or C{b""} when the pool has none.
        """
        if self.proxyProtocol == "none":
            return b""
        from .proxyprotocol import headerForConnection

        return headerForConnection(
            self.proxyProtocol, clientTransport, self.proxyProtocolCertificate
        )


@attrs.frozen
class Route:
    """
    One C{[[listeners.routes]]} entry at run time: conditions and target.

    @ivar host: C{Host} pattern, or L{None} for any.
    @ivar pathPrefix: Path prefix, or L{None} for any.
    @ivar sni: SNI pattern, or L{None} for any.
    @ivar target: Where matching traffic goes.
    @ivar poolName: The target pool's name, for logs.
    """

    target: RouteTarget
    poolName: str
    host: Optional[str] = None
    pathPrefix: Optional[str] = None
    sni: Optional[str] = None

    def matches(self, host: Optional[str], path: Optional[str], sni: Optional[str]) -> bool:
        """
        Do all of this route's conditions hold?

        @param host: From L{hostOfAuthority}, or L{None} (no request, or no
            C{Host}).
        @param path: From L{pathOfTarget}, or L{None} (no request).
        @param sni: From L{hostOfAuthority}, or L{None}.
        """
        if self.host is not None and not hostMatches(self.host, host):
            return False
        if self.pathPrefix is not None and (path is None or not pathPrefixMatches(self.pathPrefix, path)):
            return False
        if self.sni is not None and not hostMatches(self.sni, sni):
            return False
        return True


@attrs.frozen
class Router:
    """
    A listener's routes and its default target.

    @ivar routes: Tried in order.
    @ivar default: The target of the listener's C{pool}.
    @ivar defaultPoolName: Its name.
    """

    routes: tuple[Route, ...]
    default: RouteTarget
    defaultPoolName: str

    @classmethod
    def fromConfig(
        cls,
        listener: Any,
        poolConfigs: Iterable[Any],
        pools: Mapping[str, Pool],
        backendTLS: Mapping[str, Any] = {},
    ) -> Router:
        """
        Build the router of a L{mtlsproxy.config.ListenerConfig}.

        @param poolConfigs: All the L{mtlsproxy.config.PoolConfig}s.
        @param pools: The run-time pools by name.
        @param backendTLS: The backend TLS settings of the pools that have
            them, by name.
        @raise KeyError: For a pool that does not exist (the configuration
            loader refuses that earlier).
        """
        configs = {p.name: p for p in poolConfigs}

        def target(name: str) -> RouteTarget:
            return RouteTarget.fromConfig(pools[name], configs[name], backendTLS.get(name))

        routes = tuple(
            Route(
                target=target(r.pool),
                poolName=r.pool,
                host=r.host,
                pathPrefix=r.path_prefix,
                sni=r.sni,
            )
            for r in getattr(listener, "routes", ())
        )
        return cls(routes, target(listener.pool), listener.pool)

    def route(
        self, host: Optional[str] = None, path: Optional[str] = None, sni: Optional[str] = None
    ) -> tuple[str, RouteTarget]:
        """
        The first route that matches, else the default.

        @param host: The C{Host} header value (port and case do not
            matter), or L{None}.
        @param path: The request target (query ignored), or L{None}.
        @param sni: The TLS server name, or L{None}.
        @return: The pool's name and the target.
        """
        hostName = hostOfAuthority(host)
        sniName = hostOfAuthority(sni)
        pathOnly = pathOfTarget(path) if path is not None else None
        for r in self.routes:
            if r.matches(hostName, pathOnly, sniName):
                return (r.poolName, r.target)
        return (self.defaultPoolName, self.default)

    def forConnection(self, facts: ConnectionFacts) -> RouteTarget:
        """
        The target of a C{tls} or C{tcp} connection: routes by SNI only.
        The signature L{mtlsproxy.relay.ProxyServerFactory} takes as its
        C{router}.
        """
        return self.route(sni=facts.sni)[1]


ConnectionRouter = Callable[["ConnectionFacts"], RouteTarget]
"""
What L{mtlsproxy.relay.ProxyServerFactory} accepts as C{router}: the
target of a connection, from its facts.
"""


def describeRoutes(routes: Sequence[Route]) -> list[str]:
    """
    One line per route, for the start-up log.
    """
    lines = []
    for r in routes:
        conditions = [
            f"{name}={value}"
            for name, value in (("host", r.host), ("path_prefix", r.pathPrefix), ("sni", r.sni))
            if value is not None
        ]
        lines.append(f"{' '.join(conditions)} -> {r.poolName}")
    return lines
