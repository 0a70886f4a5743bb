# -*- test-case-name: mtlsproxy_example.test -*-
"""
Plugin declarations of the mtlsproxy-example-plugins distribution.

Twisted's plugin scan imports this module and records every module-level
object that provides L{twisted.plugin.IPlugin}, so keep it to declarations:
no work at import time, no reactor.  This directory has no C{__init__.py}:
C{twisted.plugins} belongs to Twisted, which extends it with every
C{twisted/plugins} directory on C{sys.path}.
"""

from mtlsproxy.health import HealthCheckerPlugin
from mtlsproxy_example.selectors import firstAvailable

# The health checker is declared by the dotted name of its constructor,
# imported on first use, so that a plugin scan does not import
# mtlsproxy_example.checkers (and the network code it pulls in).
banner = HealthCheckerPlugin(
    name="banner",
    description="Healthy if the member's first line starts with the expected text.",
    options={
        "send": 'Text to send once connected, such as "PING\\r\\n" (default: nothing).',
        "expect": "The start of the first line the member must answer with (required).",
    },
    checker="mtlsproxy_example.checkers.BannerChecker.fromOptions",
)

__all__ = ["firstAvailable", "banner"]
