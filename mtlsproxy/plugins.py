# -*- test-case-name: tests.test_plugins -*-
"""
Finding selector and health-checker plugins by the name a configuration
uses.

Plugins are module-level objects in C{twisted/plugins/*.py} modules of any
installed distribution (mtlsproxy's own are in
C{twisted/plugins/mtlsproxy_plugin.py}) that provide
L{twisted.plugin.IPlugin} and L{IBackendSelectorFactory} or
L{IHealthCheckerFactory}; L{twisted.plugin.getPlugins} finds them.  Every
call scans again (Twisted keeps a C{dropin.cache} per plugin directory, so a
scan imports only modules that changed), which suits the moments names are
resolved: start-up and reload, never per connection.

    >>> factory = selectorFactory("least_connections")
    >>> selector = factory.newSelector()
"""

from __future__ import annotations

from typing import Iterable, Sequence, TypeVar

from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface import Interface

import twisted.plugins

from .interfaces import IBackendSelectorFactory, IHealthCheckerFactory

__all__ = [
    "UnknownPlugin",
    "AmbiguousPlugin",
    "selectorFactory",
    "healthCheckerFactory",
    "availableSelectors",
    "availableHealthCheckers",
    "selectorFactoriesByName",
    "healthCheckerFactoriesByName",
]

_log = Logger()

_T = TypeVar("_T", bound=Interface)

SELECTOR = "selector"
HEALTH_CHECKER = "health checker"


class UnknownPlugin(KeyError):
    """
    No installed plugin has the requested name.

    A L{KeyError}, because that is what looking a name up in a mapping
    raises, but its message is a sentence for the operator rather than the
    quoted key.

    @ivar kind: What was looked for: C{"selector"} or C{"health checker"}.
    @ivar name: The name that was asked for.
    @ivar available: The names that are installed, sorted.
    """

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.available: tuple[str, ...] = tuple(sorted(available))
        KeyError.__init__(self, kind, name, self.available)

    def __str__(self) -> str:
        names = ", ".join(self.available) if self.available else "(none installed)"
        return f"unknown {self.kind} {self.name!r}; available: {names}"


class AmbiguousPlugin(LookupError):
    """
    More than one installed plugin declares the requested name, so which one
    the configuration means is unknown.

    @ivar kind: C{"selector"} or C{"health checker"}.
    @ivar name: The name that was asked for.
    @ivar plugins: The plugin objects that declare it.
    """

    def __init__(self, kind: str, name: str, plugins: Sequence[object]) -> None:
        self.kind = kind
        self.name = name
        self.plugins = tuple(plugins)
        LookupError.__init__(self, kind, name, self.plugins)

    def __str__(self) -> str:
        declared = "; ".join(repr(plugin) for plugin in self.plugins)
        return (
            f"{self.kind} {self.name!r} is declared by {len(self.plugins)} installed"
            f" plugins: {declared}; uninstall or rename all but one"
        )


def _byName(interface: type[_T], kind: str) -> dict[str, list[_T]]:
    """
    Scan the plugin package for providers of C{interface}, grouped by name.

    A provider without a usable C{name} is logged and left out.  The same
    object found twice (a plugin directory on the path twice) counts once.
    """
    found: dict[str, list[_T]] = {}
    for plugin in getPlugins(interface, twisted.plugins):
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            _log.warn(
                "Ignoring {kind} plugin {plugin!r}: its name is {name!r}, not a non-empty str",
                kind=kind,
                plugin=plugin,
                name=name,
            )
            continue
        same = found.setdefault(name, [])
        if not any(plugin is other for other in same):
            same.append(plugin)
    return found


def _lookup(interface: type[_T], kind: str, name: str) -> _T:
    found = _byName(interface, kind)
    plugins = found.get(name)
    if not plugins:
        raise UnknownPlugin(kind, name, found)
    if len(plugins) > 1:
        raise AmbiguousPlugin(kind, name, plugins)
    return plugins[0]


def selectorFactory(name: str) -> IBackendSelectorFactory:
    """
    The selector plugin that C{selector = "NAME"} in a pool refers to.

    @param name: The configured name, e.g. C{"round_robin"}.
    @return: The plugin; call its C{newSelector()} once per pool.
    @raise UnknownPlugin: If no installed plugin has that name (the message
        lists the names that are installed).
    @raise AmbiguousPlugin: If several installed plugins declare it.
    """
    return _lookup(IBackendSelectorFactory, SELECTOR, name)


def healthCheckerFactory(name: str) -> IHealthCheckerFactory:
    """
    The health-checker plugin that C{[pools.health_check] type = "NAME"}
    refers to.

    @param name: The configured name.
    @return: The plugin; call its C{newChecker(reactor, options, tls)} once
        per pool.
    @raise UnknownPlugin: If no installed plugin has that name (the message
        lists the names that are installed).
    @raise AmbiguousPlugin: If several installed plugins declare it.
    """
    return _lookup(IHealthCheckerFactory, HEALTH_CHECKER, name)


def availableSelectors() -> list[str]:
    """
    The names of the installed selector plugins, sorted.
    """
    return sorted(_byName(IBackendSelectorFactory, SELECTOR))


def availableHealthCheckers() -> list[str]:
    """
    The names of the installed health-checker plugins, sorted.
    """
    return sorted(_byName(IHealthCheckerFactory, HEALTH_CHECKER))


def selectorFactoriesByName() -> dict[str, IBackendSelectorFactory]:
    """
    Every installed selector plugin by name, for listing them with their
    descriptions.  A name declared by several plugins is left out (and
    L{selectorFactory} reports it).
    """
    return {
        name: plugins[0]
        for name, plugins in _byName(IBackendSelectorFactory, SELECTOR).items()
        if len(plugins) == 1
    }


def healthCheckerFactoriesByName() -> dict[str, IHealthCheckerFactory]:
    """
    Every installed health-checker plugin by name (the C{factories} mapping
    L{mtlsproxy.health} takes).  A name declared by several plugins is left
    out (and L{healthCheckerFactory} reports it).
    """
    return {
        name: plugins[0]
        for name, plugins in _byName(IHealthCheckerFactory, HEALTH_CHECKER).items()
        if len(plugins) == 1
    }
