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
