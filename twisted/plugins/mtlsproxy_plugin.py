# -*- test-case-name: tests.test_plugins,tests.test_packaging -*-
"""
Plugin declarations for mtlsproxy.

Only declarations live here: the twistd L{ServiceMaker} pointing at the tap
module by dotted name, and the module-level instances of the built-in
selector plugins (found by name through L{mtlsproxy.plugins}).  Nothing heavy
is imported and no reactor is installed, because Twisted imports this module
whenever it scans for plugins: L{mtlsproxy.selectors} imports only the
standard library, attrs and zope.interface.
"""

from twisted.application.service import ServiceMaker

import mtlsproxy.selectors as _selectors

mtlsproxy = ServiceMaker(
    "mtlsproxy",
    "mtlsproxy.tap",
    "A TCP/TLS proxy and load balancer with mutual TLS.",
    "mtlsproxy",
)

# Backend selectors: what `selector = "NAME"` in a [[pools]] table refers to.
# Each object appears once in this module's namespace (the scan records every
# attribute that provides IPlugin).
roundRobin = _selectors.roundRobin
leastConnections = _selectors.leastConnections
randomTwoChoices = _selectors.randomTwoChoices
sourceIPHash = _selectors.sourceIPHash
clientIdentityHash = _selectors.clientIdentityHash

# Health checkers: what `[pools.health_check] type = "NAME"` refers to.  They
# are declared by the dotted name of their constructor, so that a plugin scan
# imports only mtlsproxy.health (attrs, zope.interface, twisted.application),
# not the TLS and HTTP client code of mtlsproxy.checkers.
from mtlsproxy.health import HealthCheckerPlugin as _HealthCheckerPlugin  # noqa: E402

tcpHealthChecker = _HealthCheckerPlugin(
    name="tcp",
    description="Healthy if a TCP connection to the member can be made.",
    options={},
    checker="mtlsproxy.checkers.TCPChecker.fromOptions",
)
tlsHealthChecker = _HealthCheckerPlugin(
    name="tls",
    description=(
        "Healthy if a TLS handshake with the member completes, verified with the"
        " pool's backend TLS settings when it has them."
    ),
    options={},
    checker="mtlsproxy.checkers.TLSChecker.fromOptions",
)
httpHealthChecker = _HealthCheckerPlugin(
    name="http",
    description=(
        "Healthy if GET path answers with an expected status (and body text);"
        " over TLS when the pool has backend TLS settings."
    ),
    options={
        "path": 'The request path, default "/".',
        "expected_status": (
            'Status codes that pass: ranges and codes separated by commas,'
            ' default "200-399".'
        ),
        "body_contains": "Text the first 64 KiB of the body must contain (default: not checked).",
        "host": (
            "The Host header (default: the member's address, with the port unless"
            " it is the scheme's default)."
        ),
    },
    checker="mtlsproxy.checkers.HTTPChecker.fromOptions",
)
