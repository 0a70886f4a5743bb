# -*- test-case-name: mtlsproxy_example.test -*-
"""
Plugin declarations of the mtlsproxy-example-plugins distribution.

Twisted's plugin scan imports this module and records every module-level
object that provides L{twisted.plugin.IPlugin}, so keep it to declarations:
no work at import time, no reactor.  This directory has no C{__init__.py}:
C{twisted.plugins} belongs to Twisted, which extends it with every
C{twisted/plugins} directory on C{sys.path}.
"""

from mtlsproxy_example.selectors import firstAvailable

# Health checkers go here too, e.g.:
# from mtlsproxy_example.checkers import tlsHandshake

__all__ = ["firstAvailable"]
