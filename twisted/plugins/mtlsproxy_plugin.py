# -*- test-case-name: tests.test_plugin -*-
"""
Plugin declarations for mtlsproxy.

Only declarations live here: the twistd L{ServiceMaker} pointing at the tap
module by dotted name.  Nothing heavy is imported and no reactor is
installed, because Twisted imports this module whenever it scans for plugins.
"""

from twisted.application.service import ServiceMaker

mtlsproxy = ServiceMaker(
    "mtlsproxy",
    "mtlsproxy.tap",
    "A TCP/TLS proxy and load balancer with mutual TLS.",
    "mtlsproxy",
)
