# -*- test-case-name: tests.test_routing -*-
"""
Tests for L{mtlsproxy.routing} and the C{[[listeners.routes]]} settings.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.config import ListenerConfig, PoolConfig, ProxyConfig, RouteConfig
from mtlsproxy.errors import ConfigurationError
from mtlsproxy.pool import ConnectionFacts, Member, Pool
from mtlsproxy.routing import (
    Route,
    Router,
    RouteTarget,
    hostMatches,
    hostOfAuthority,
    hostPatternProblem,
    pathOfTarget,
    pathPrefixMatches,
    pathPrefixProblem,
)


class MatchingTests(SynchronousTestCase):
    """
    Host, SNI and path matching.
    """

    def test_hostOfAuthority(self) -> None:
        """
        When a C{Host} value has a port, upper case, a trailing dot or IPv6
        brackets, matching sees the bare lower-case name.
        """
        self.assertEqual(hostOfAuthority("API.Example.com:8443"), "api.example.com")
        self.assertEqual(hostOfAuthority("example.com."), "example.com")
        self.assertEqual(hostOfAuthority("[2001:db8::1]:443"), "2001:db8::1")
        self.assertEqual(hostOfAuthority("2001:db8::1"), "2001:db8::1")
        self.assertIsNone(hostOfAuthority(""))
        self.assertIsNone(hostOfAuthority(None))

    def test_exactHost(self) -> None:
        """
        An exact pattern matches that name only, in any case.
        """
        self.assertTrue(hostMatches("api.example.com", "api.example.com"))
        self.assertTrue(hostMatches("API.example.com", "api.example.com"))
        self.assertFalse(hostMatches("api.example.com", "www.example.com"))
        self.assertFalse(hostMatches("api.example.com", None))

    def test_wildcardOneLabel(self) -> None:
        """
        C{*.example.com} matches one label in front of C{example.com}, not
        the bare domain nor two labels (as an Ingress wildcard).
        """
        self.assertTrue(hostMatches("*.example.com", "a.example.com"))
        self.assertFalse(hostMatches("*.example.com", "example.com"))
        self.assertFalse(hostMatches("*.example.com", "a.b.example.com"))
        self.assertFalse(hostMatches("*.example.com", "aexample.com"))

    def test_pathPrefixSegments(self) -> None:
        """
        A path prefix matches whole segments; a trailing slash does not
        matter; C{/} matches everything.
        """
        for prefix in ("/v1", "/v1/"):
            self.assertTrue(pathPrefixMatches(prefix, "/v1"))
            self.assertTrue(pathPrefixMatches(prefix, "/v1/"))
            self.assertTrue(pathPrefixMatches(prefix, "/v1/users"))
            self.assertFalse(pathPrefixMatches(prefix, "/v10"))
            self.assertFalse(pathPrefixMatches(prefix, "/v"))
        self.assertTrue(pathPrefixMatches("/", "/anything"))

    def test_pathOfTarget(self) -> None:
        """
        The query and fragment are not part of the matched path; an
        absolute-form target is matched by its path.
        """
        self.assertEqual(pathOfTarget("/a/b?c=/d"), "/a/b")
        self.assertEqual(pathOfTarget("https://h.example/a?x"), "/a")
        self.assertEqual(pathOfTarget("https://h.example"), "/")
        self.assertEqual(pathOfTarget("*"), "*")

    @given(st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=4), st.text(alphabet="abc/", max_size=6))
    def test_prefixProperty(self, segments: list[str], rest: str) -> None:
        """
        A prefix made of segments matches itself and anything below it, and
        never a path that only shares its characters.
        """
        prefix = "/" + "/".join(segments)
        self.assertTrue(pathPrefixMatches(prefix, prefix))
        self.assertTrue(pathPrefixMatches(prefix, prefix + "/" + rest))
        self.assertFalse(pathPrefixMatches(prefix, prefix + "x" + rest))

    def test_patternProblems(self) -> None:
        """
        Host patterns and path prefixes are checked.
        """
        for good in ("a.example.com", "*.example.com", "localhost", "x-y.z"):
            self.assertIsNone(hostPatternProblem(good), good)
        for bad in ("", "*", "a.*.com", "exa mple.com", "-a.com", "*example.com", 3):
            self.assertIsNotNone(hostPatternProblem(bad), bad)
        self.assertIsNone(pathPrefixProblem("/v1/"))
        for bad in ("v1", "/a b", "/a?b", "", None):
            self.assertIsNotNone(pathPrefixProblem(bad), bad)


@attrs.frozen
class _MemberConfig:
    address: str
    port: int
    weight: int = 1


def _target(name: str) -> RouteTarget:
    return RouteTarget(Pool(name, [Member(_MemberConfig("127.0.0.1", 1))], object()), 5.0, 3)


class RouterTests(SynchronousTestCase):
    """
    L{Router}.
    """

    def setUp(self) -> None:
        self.default = _target("web")
        self.api = _target("api")
        self.v1 = _target("v1")
        self.a = _target("a")
        self.router = Router(
            (
                Route(self.v1, "v1", host="api.example.com", pathPrefix="/v1/"),
                Route(self.api, "api", host="*.example.com"),
                Route(self.a, "a", sni="a.example.com"),
            ),
            self.default,
            "web",
        )

    def test_firstMatchWins(self) -> None:
        """
        Routes are tried in order; the first whose conditions all hold wins.
        """
        self.assertEqual(self.router.route("api.example.com", "/v1/x", None)[0], "v1")
        self.assertEqual(self.router.route("api.example.com", "/v2/x", None)[0], "api")
        self.assertEqual(self.router.route("www.example.com", "/v1/x", None)[0], "api")

    def test_default(self) -> None:
        """
        When no route matches, the listener's pool is used.
        """
        self.assertEqual(self.router.route("other.org", "/", None), ("web", self.default))
        self.assertEqual(self.router.route(None, None, None), ("web", self.default))

    def test_sni(self) -> None:
        """
        A C{tls} listener routes connections by SNI.
        """
        facts = ConnectionFacts(listener="l", peerHost="1.2.3.4", peerPort=1, sni="A.example.com")
        self.assertIs(self.router.forConnection(facts), self.a)
        facts = ConnectionFacts(listener="l", peerHost="1.2.3.4", peerPort=1, sni=None)
        self.assertIs(self.router.forConnection(facts), self.default)

    def test_fromConfig(self) -> None:
        """
        A router is built from a listener's routes and the pools.
        """
        listener = _listener(
            "https", routes=(RouteConfig(pool="api", host="api.example.com"),)
        )
        pools = {"web": self.default.pool, "api": self.api.pool}
        router = Router.fromConfig(listener, [_pool("web"), _pool("api", proxy_protocol="v2")], pools)
        name, target = router.route("api.example.com", "/", None)
        self.assertEqual(name, "api")
        self.assertIs(target.pool, self.api.pool)
        self.assertEqual(target.proxyProtocol, "v2")
        self.assertEqual(router.route("x", "/", None)[0], "web")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _pool(name: str, **kwargs: Any) -> PoolConfig:
    from mtlsproxy.config import MemberConfig

    return PoolConfig(name=name, members=(MemberConfig(address="127.0.0.1", port=1),), **kwargs)


def _listener(protocol: str, **kwargs: Any) -> ListenerConfig:
    from mtlsproxy.config import CertificateConfig

    if protocol != "tcp":
        kwargs.setdefault("certificates", (CertificateConfig(cert="/c.pem", key="/k.pem"),))
    return ListenerConfig(name="l", endpoint="tcp:0", protocol=protocol, pool="web", **kwargs)


class RouteConfigTests(SynchronousTestCase):
    """
    Validation of C{[[listeners.routes]]} and the settings of issue 8.
    """

    def assertProblem(self, expected: str, build: Any) -> None:
        error = self.assertRaises(ConfigurationError, build)
        self.assertIn(expected, str(error))

    def test_routeNeedsCondition(self) -> None:
        """
        A route without host, path_prefix or sni is refused.
        """
        self.assertProblem("at least one of host, path_prefix or sni", lambda: RouteConfig(pool="a"))

    def test_badPatterns(self) -> None:
        """
        A bad host pattern or path prefix is refused, naming the key.
        """
        error = self.assertRaises(ConfigurationError, RouteConfig, pool="a", host="a.*.b")
        self.assertEqual(error.key, "host")
        error = self.assertRaises(ConfigurationError, RouteConfig, pool="a", path_prefix="v1")
        self.assertEqual(error.key, "path_prefix")

    def test_tlsRoutesBySNIOnly(self) -> None:
        """
        A C{tls} listener refuses host and path_prefix routes.
        """
        error = self.assertRaises(
            ConfigurationError, _listener, "tls", routes=(RouteConfig(pool="a", host="x.y"),)
        )
        self.assertEqual(error.key, "routes[0].host")
        _listener("tls", routes=(RouteConfig(pool="a", sni="x.y"),))

    def test_tcpHasNoRoutes(self) -> None:
        """
        A C{tcp} listener refuses routes.
        """
        self.assertProblem(
            'routes need protocol = "tls"',
            lambda: _listener("tcp", routes=(RouteConfig(pool="a", sni="x.y"),)),
        )

    def test_httpsOnlyKeys(self) -> None:
        """
        The HTTP keys are refused on a C{tls} listener.
        """
        error = self.assertRaises(
            ConfigurationError, _listener, "tls", client_identity_headers="xfcc"
        )
        self.assertEqual(error.key, "client_identity_headers")
        self.assertIn('only allowed with protocol = "https"', str(error))

    def test_proxyProtocolNeedsTrustedProxies(self) -> None:
        """
        C{accept_proxy_protocol} needs C{trusted_proxies}, and the other way
        round; a bad CIDR block is refused with its index.
        """
        self.assertProblem("needs trusted_proxies", lambda: _listener("tcp", accept_proxy_protocol=True))
        self.assertProblem(
            "only used with accept_proxy_protocol", lambda: _listener("tcp", trusted_proxies=("127.0.0.1/32",))
        )
        error = self.assertRaises(
            ConfigurationError,
            _listener,
            "tcp",
            accept_proxy_protocol=True,
            trusted_proxies=("10.0.0.1/8",),
        )
        self.assertEqual(error.key, "trusted_proxies[0]")
        _listener("tcp", accept_proxy_protocol=True, trusted_proxies=("10.0.0.0/8", "::1"))

    def test_passthroughNeedsIdentityHeaders(self) -> None:
        """
        An C{https} listener with C{client_auth = "passthrough"} must tell
        the backend: C{client_identity_headers = "none"} is refused.
        """
        error = self.assertRaises(
            ConfigurationError,
            _listener,
            "https",
            client_auth="passthrough",
            ca_certificates=("/ca.pem",),
        )
        self.assertEqual(error.key, "client_identity_headers")
        _listener(
            "https",
            client_auth="passthrough",
            ca_certificates=("/ca.pem",),
            client_identity_headers="simple",
        )

    def test_routeToUnknownPool(self) -> None:
        """
        A route to a pool that does not exist is refused, with its key path.
        """
        error = self.assertRaises(
            ConfigurationError,
            ProxyConfig,
            path="/etc/p.toml",
            listeners=(_listener("https", routes=(RouteConfig(pool="nope", host="a.b"),)),),
            pools=(_pool("web"),),
        )
        self.assertEqual(error.key, "listeners[0].routes[0].pool")

    def test_tlsPassthroughNeedsProxyProtocol(self) -> None:
        """
        A C{tls} listener with C{client_auth = "passthrough"} needs PROXY v2
        on its pools: the backend has no other way to learn the result.
        """
        listener = _listener("tls", client_auth="passthrough", ca_certificates=("/ca.pem",))
        error = self.assertRaises(
            ConfigurationError, ProxyConfig, path="/p.toml", listeners=(listener,), pools=(_pool("web"),)
        )
        self.assertEqual(error.key, "listeners[0].client_auth")
        ProxyConfig(path="/p.toml", listeners=(listener,), pools=(_pool("web", proxy_protocol="v2"),))

    def test_certificateTLVNeedsV2(self) -> None:
        """
        C{proxy_protocol_certificate} needs C{proxy_protocol = "v2"}.
        """
        error = self.assertRaises(ConfigurationError, _pool, "p", proxy_protocol_certificate=True)
        self.assertEqual(error.key, "proxy_protocol_certificate")
