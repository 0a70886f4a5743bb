"""
Example mtlsproxy plugins, shipped as their own distribution.

  - L{mtlsproxy_example.selectors}: the C{first_available} backend selector.
  - L{mtlsproxy_example.checkers}: the C{banner} health checker.

The plugin objects are declared in C{twisted/plugins/mtlsproxy_example_plugin.py},
which is what Twisted's plugin scan imports; the code lives here, in an
ordinary package.
"""
