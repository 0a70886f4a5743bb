"""
mtlsproxy: a Twisted TCP/TLS proxy and load balancer built around mutual TLS.

The public API for plugin authors is the interfaces in L{mtlsproxy.interfaces},
the run-time state they see in L{mtlsproxy.pool} and the fakes in
L{mtlsproxy.testing}.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
