"""
Example mtlsproxy plugins, shipped as their own distribution.

  - L{mtlsproxy_example.selectors}: the C{first_available} backend selector.
  - C{mtlsproxy_example.checkers}: example health checkers (to come).

The plugin objects are declared in C{twisted/plugins/mtlsproxy_example_plugin.py},
which is what Twisted's plugin scan imports; the code lives here, in an
ordinary package.
"""
