"""
Tests for L{mtlsproxy.plugins}: finding selector and health-checker plugins
by name, built-in and from other distributions (the example in
C{examples/mtlsproxy-example-plugins}).
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins, pluginPackagePaths
from twisted.trial.unittest import SynchronousTestCase, TestCase

import twisted.plugins

import mtlsproxy.testing
from mtlsproxy import plugins, selectors
from mtlsproxy.interfaces import IBackendSelectorFactory
from mtlsproxy.plugins import (
    AmbiguousPlugin,
    UnknownPlugin,
    availableHealthCheckers,
    availableSelectors,
    healthCheckerFactory,
    selectorFactory,
)
from mtlsproxy.selectors import BUILTIN_SELECTORS, SelectorFactory
from mtlsproxy.testing import verifySelectorPlugin

from .harness import REPO

EXAMPLE = os.path.join(REPO, "examples", "mtlsproxy-example-plugins")

_BUILD_LEFTOVERS = shutil.ignore_patterns("build", "*.egg-info", "dropin.cache", "__pycache__")

BUILTIN_NAMES = [
    "client_identity_hash",
    "least_connections",
    "random_two_choices",
    "round_robin",
    "source_ip_hash",
]


def addPluginPath(testCase: SynchronousTestCase, root: str) -> Any:
    """
    Make C{root} (a distribution's top directory, holding C{twisted/plugins/})
    importable and part of the plugin scan until the test ends, the way an
    installed distribution would be.

    C{twisted.plugins} computes its C{__path__} once, when first imported,
    from every C{sys.path} entry (L{pluginPackagePaths}); an entry added
    later must be added to C{__path__} as well.  Modules imported from
    C{root} are forgotten afterwards.

    @return: The patcher; its C{restore()} undoes the path changes early
        (they are undone at the end of the test in any case).
    """
    before = set(sys.modules)
    patcher = testCase.patch(sys, "path", [root] + sys.path)
    # What twisted/plugins/__init__.py would have found had root been on
    # sys.path when it was imported.
    newPaths = [
        path
        for path in pluginPackagePaths(twisted.plugins.__name__)
        if path not in twisted.plugins.__path__
    ]
    patcher.addPatch(twisted.plugins, "__path__", list(twisted.plugins.__path__) + newPaths)
    patcher.patch()

    def forget() -> None:
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            if (getattr(module, "__file__", None) or "").startswith(root + os.sep):
                del sys.modules[name]
                parent, _, attribute = name.rpartition(".")
                if getattr(sys.modules.get(parent), attribute, None) is module:
                    delattr(sys.modules[parent], attribute)

    testCase.addCleanup(forget)
    return patcher


def writePluginModule(testCase: SynchronousTestCase, name: str, source: str) -> str:
    """
    Write a plugin module C{twisted/plugins/NAME.py} under a new directory
    and add that directory to the plugin scan until the test ends.

    @return: The new directory.
    """
    root = os.path.abspath(testCase.mktemp())
    os.makedirs(os.path.join(root, "twisted", "plugins"))
    with open(os.path.join(root, "twisted", "plugins", name + ".py"), "w") as f:
        f.write(textwrap.dedent(source))
    addPluginPath(testCase, root)
    return root


class DiscoveryTests(SynchronousTestCase):
    """
    Tests for finding plugins by name.
    """

    def test_getPluginsFindsBuiltins(self) -> None:
        """
        When Twisted's plugin scan looks for selector factories, it finds
        the five built-in ones, declared in C{mtlsproxy_plugin}.
        """
        found = {
            p.name: p for p in getPlugins(IBackendSelectorFactory, twisted.plugins)
        }
        for name in BUILTIN_NAMES:
            self.assertIs(found[name], BUILTIN_SELECTORS[name])

    def test_selectorByName(self) -> None:
        """
        When a built-in selector is asked for by name, its factory is
        returned, and every built-in name is listed as available.
        """
        for name in BUILTIN_NAMES:
            self.assertIs(selectorFactory(name), BUILTIN_SELECTORS[name])
        self.assertTrue(set(BUILTIN_NAMES) <= set(availableSelectors()))
        self.assertEqual(availableSelectors(), sorted(availableSelectors()))

    def test_unknownSelectorListsAvailable(self) -> None:
        """
        When an unknown selector is asked for, L{UnknownPlugin} (a
        L{KeyError}) is raised, and its message names what was asked for and
        lists the installed selectors, sorted.
        """
        error = self.assertRaises(UnknownPlugin, selectorFactory, "least_conn")
        self.assertIsInstance(error, KeyError)
        self.assertEqual((error.kind, error.name), ("selector", "least_conn"))
        self.assertEqual(list(error.available), availableSelectors())
        self.assertEqual(
            str(error),
            "unknown selector 'least_conn'; available: " + ", ".join(availableSelectors()),
        )
        self.assertIn(
            "client_identity_hash, least_connections, random_two_choices, round_robin,"
            " source_ip_hash",
            str(error),
        )

    def test_unknownHealthCheckerListsAvailable(self) -> None:
        """
        When an unknown health checker is asked for, the message lists the
        installed ones, or says there are none.
        """
        error = self.assertRaises(UnknownPlugin, healthCheckerFactory, "no_such_check")
        available = availableHealthCheckers()
        self.assertEqual(
            str(error),
            "unknown health checker 'no_such_check'; available: "
            + (", ".join(available) if available else "(none installed)"),
        )
        self.assertEqual(
            str(UnknownPlugin("health checker", "tcp", [])),
            "unknown health checker 'tcp'; available: (none installed)",
        )

    def test_selectorFactoriesStillWorks(self) -> None:
        """
        When the older L{selectors.selectorFactories} is called, it maps each
        available name to the same factory as L{selectorFactory}.
        """
        factories = selectors.selectorFactories()
        self.assertEqual(sorted(factories), availableSelectors())
        for name, factory in factories.items():
            self.assertIs(factory, selectorFactory(name))

    def test_healthCheckerFromAnotherDirectory(self) -> None:
        """
        When a plugin module declares a health checker, it is found by name
        and listed with the others.
        """
        writePluginModule(
            self,
            "mtlsproxy_test_checker",
            """
            from twisted.plugin import IPlugin
            from zope.interface import implementer
            from mtlsproxy.interfaces import IHealthCheckerFactory

            @implementer(IPlugin, IHealthCheckerFactory)
            class Always:
                name = "test_always"
                description = "For a test."
                options = {}

                def newChecker(self, reactor, options, tls):
                    raise NotImplementedError()

            always = Always()
            """,
        )
        factory = healthCheckerFactory("test_always")
        self.assertEqual(factory.description, "For a test.")
        self.assertIn("test_always", availableHealthCheckers())
        self.assertIs(plugins.healthCheckerFactoriesByName()["test_always"], factory)

    def test_pluginFromAnotherDirectory(self) -> None:
        """
        When a plugin module in another C{twisted/plugins} directory
        declares a selector, it is found by name, alongside the built-ins.
        """
        writePluginModule(
            self,
            "mtlsproxy_test_extra",
            """
            from mtlsproxy.selectors import SelectorFactory, SmoothWeightedRoundRobin
            extra = SelectorFactory("test_extra", "For a test.", SmoothWeightedRoundRobin)
            """,
        )
        factory = selectorFactory("test_extra")
        self.assertEqual(factory.description, "For a test.")
        self.assertIn("test_extra", availableSelectors())
        self.assertIs(selectorFactory("round_robin"), BUILTIN_SELECTORS["round_robin"])

    def test_ambiguousName(self) -> None:
        """
        When two plugins declare the same name, asking for it raises
        L{AmbiguousPlugin} naming both (rather than picking one silently),
        the name is still listed once, and the older mapping leaves it out.
        """
        writePluginModule(
            self,
            "mtlsproxy_test_duplicate",
            """
            from mtlsproxy.selectors import SelectorFactory, SmoothWeightedRoundRobin
            impostor = SelectorFactory("round_robin", "Another one.", SmoothWeightedRoundRobin)
            """,
        )
        error = self.assertRaises(AmbiguousPlugin, selectorFactory, "round_robin")
        self.assertEqual((error.kind, error.name), ("selector", "round_robin"))
        self.assertEqual(len(error.plugins), 2)
        self.assertIn(BUILTIN_SELECTORS["round_robin"], error.plugins)
        self.assertTrue(
            str(error).startswith("selector 'round_robin' is declared by 2 installed plugins: "),
            str(error),
        )
        self.assertIn("Another one.", str(error))
        self.assertEqual(availableSelectors().count("round_robin"), 1)
        self.assertNotIn("round_robin", selectors.selectorFactories())
        self.assertIs(selectorFactory("least_connections"), BUILTIN_SELECTORS["least_connections"])

    def test_namelessPluginIgnored(self) -> None:
        """
        When a plugin declares a selector factory without a usable name, it
        is left out and a warning names it.
        """
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        writePluginModule(
            self,
            "mtlsproxy_test_nameless",
            """
            from mtlsproxy.selectors import SelectorFactory, SmoothWeightedRoundRobin
            nameless = SelectorFactory("", "No name.", SmoothWeightedRoundRobin)
            """,
        )
        self.assertNotIn("", availableSelectors())
        warnings = [e for e in events if e.get("log_namespace") == "mtlsproxy.plugins"]
        self.assertTrue(warnings)
        self.assertEqual(
            warnings[0]["log_format"],
            "Ignoring {kind} plugin {plugin!r}: its name is {name!r}, not a non-empty str",
        )
        self.assertEqual((warnings[0]["kind"], warnings[0]["name"]), ("selector", ""))

    def test_pluginModuleIsLight(self) -> None:
        """
        When the plugin module is imported (as every plugin scan does), no
        reactor is installed and no TLS library or service code is loaded.
        """
        script = (
            "import sys, json\n"
            "import twisted.plugins.mtlsproxy_plugin\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(("
            "'twisted.internet.reactor', 'OpenSSL', 'cryptography',"
            " 'mtlsproxy.service', 'mtlsproxy.tap', 'mtlsproxy.relay')))))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), [])


class TestingModuleTests(SynchronousTestCase):
    """
    Tests for L{mtlsproxy.testing} beyond its use in the selector tests.
    """

    def test_docstringExamples(self) -> None:
        """
        When the examples in the docstrings of L{mtlsproxy.testing} and
        L{mtlsproxy.plugins} run, they give what they show.
        """
        for module in (mtlsproxy.testing, plugins):
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
            self.assertEqual(result.failed, 0, module.__name__)
            self.assertTrue(result.attempted, module.__name__)

    def test_foreignPickRejected(self) -> None:
        """
        When a selector returns something that is not a candidate,
        L{mtlsproxy.testing.pickMany} fails the way the pool would refuse
        it.
        """
        pool = mtlsproxy.testing.fakePool(1, 1)
        stranger = mtlsproxy.testing.FakeMember("203.0.113.1", 1)

        class Foreign:
            def pick(self, candidates: Any, facts: Any) -> Any:
                return stranger

        self.assertRaises(AssertionError, mtlsproxy.testing.pickMany, Foreign(), pool)

    def test_verifyCatchesMissingIPlugin(self) -> None:
        """
        When a selector factory does not provide L{IPlugin} (so the plugin
        scan would never see it), L{verifySelectorPlugin} says so.
        """
        from zope.interface import implementer

        @implementer(IBackendSelectorFactory)
        class Invisible:
            name = "invisible"
            description = "Not an IPlugin."

            def newSelector(self) -> Any:
                return selectors.SmoothWeightedRoundRobin()

        error = self.assertRaises(AssertionError, verifySelectorPlugin, Invisible())
        self.assertIn("IPlugin", str(error))

    def test_clock(self) -> None:
        """
        When a plugin test needs a clock, L{mtlsproxy.testing} offers
        Twisted's L{MemoryReactorClock}.
        """
        from twisted.internet.testing import MemoryReactorClock

        self.assertIs(mtlsproxy.testing.MemoryReactorClock, MemoryReactorClock)
        clock = mtlsproxy.testing.MemoryReactorClock()
        called: list[bool] = []
        clock.callLater(5, called.append, True)
        clock.advance(5)
        self.assertEqual(called, [True])


class ExamplePluginTests(SynchronousTestCase):
    """
    The example third-party distribution, found from a directory on
    C{sys.path} (as from an unpacked or installed distribution).
    """

    def test_exampleDiscoveredFromSysPath(self) -> None:
        """
        When the example distribution's directory is put on C{sys.path}, the
        plugin scan finds C{first_available}, it passes the selector plugin
        checks, and it is gone again once the path is restored.
        """
        # A copy, so that the scan writes its dropin.cache outside the checkout.
        root = os.path.abspath(self.mktemp())
        shutil.copytree(EXAMPLE, root, ignore=_BUILD_LEFTOVERS)
        self.assertFalse(os.path.exists(os.path.join(root, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(root, "twisted", "plugins", "__init__.py")))
        self.assertNotIn("first_available", availableSelectors())

        patcher = addPluginPath(self, root)
        found = {p.name: p for p in getPlugins(IBackendSelectorFactory, twisted.plugins)}
        factory = selectorFactory("first_available")
        self.assertIs(found["first_available"], factory)
        self.assertTrue(str(sys.modules[type(factory).__module__].__file__).startswith(root))
        self.assertTrue(
            str(sys.modules["twisted.plugins.mtlsproxy_example_plugin"].__file__).startswith(root)
        )
        selector = verifySelectorPlugin(factory)
        pool = mtlsproxy.testing.fakePool(1, 1)
        self.assertIs(selector.pick(pool.candidates(), mtlsproxy.testing.connectionFacts()), pool[0])

        patcher.restore()
        self.assertNotIn("first_available", availableSelectors())
        self.assertRaises(UnknownPlugin, selectorFactory, "first_available")


class ExampleDistributionTests(TestCase):
    """
    The example distribution, built and installed with pip into a directory
    of its own, used by another Python process.
    """

    timeout = 180

    @defer.inlineCallbacks
    def test_installedExampleDiscovered(self) -> Any:
        """
        When the example distribution is installed with pip into a separate
        directory and a Python process has that directory on its path, the
        plugin scan finds C{first_available} there,
        L{mtlsproxy.plugins.selectorFactory} returns it,
        L{mtlsproxy.plugins.healthCheckerFactory} returns its C{banner}
        checker (whose code is imported only when a checker is made), and the
        distribution's own tests pass.
        """
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "source")
        target = os.path.join(work, "site")
        run = os.path.join(work, "run")
        # pip builds in the source tree (build/, *.egg-info): use a copy.
        shutil.copytree(EXAMPLE, source, ignore=_BUILD_LEFTOVERS)
        os.makedirs(run)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "-q", "--target", target, source],
            env=env, path=run, reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        self.assertTrue(
            os.path.exists(os.path.join(target, "twisted", "plugins", "mtlsproxy_example_plugin.py"))
        )
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "plugins", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "__init__.py")))

        script = textwrap.dedent(
            """
            import json, sys
            import twisted.plugins
            from twisted.plugin import getPlugins
            from twisted.internet.testing import MemoryReactorClock
            from mtlsproxy.interfaces import IBackendSelectorFactory, IHealthCheckerFactory
            from mtlsproxy.plugins import (
                availableHealthCheckers, availableSelectors, healthCheckerFactory,
                selectorFactory)
            found = {p.name: p for p in getPlugins(IBackendSelectorFactory, twisted.plugins)}
            factory = selectorFactory("first_available")
            checkers = {p.name: p for p in getPlugins(IHealthCheckerFactory, twisted.plugins)}
            banner = healthCheckerFactory("banner")
            lazy = "mtlsproxy_example.checkers" not in sys.modules
            checker = banner.newChecker(MemoryReactorClock(), {"expect": "220 "}, None)
            print(json.dumps({
                "same": found["first_available"] is factory,
                "available": availableSelectors(),
                "sameChecker": checkers["banner"] is banner,
                "checkers": availableHealthCheckers(),
                "checkerOptions": sorted(banner.options),
                "lazy": lazy,
                "checkerModule": sys.modules[type(checker).__module__].__file__,
                "pluginModule": sys.modules["twisted.plugins.mtlsproxy_example_plugin"].__file__,
                "factoryModule": sys.modules[type(factory).__module__].__file__,
                "twisted": twisted.plugins.__file__,
            }))
            """
        )
        env["PYTHONPATH"] = target
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", script], env=env, path=run, reactor=reactor
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        result = json.loads(out)
        self.assertTrue(result["same"])
        self.assertTrue(set(BUILTIN_NAMES + ["first_available"]) <= set(result["available"]))
        self.assertTrue(result["pluginModule"].startswith(target + os.sep), result)
        self.assertTrue(result["factoryModule"].startswith(target + os.sep), result)
        self.assertTrue(result["sameChecker"], result)
        self.assertIn("banner", result["checkers"])
        self.assertEqual(result["checkerOptions"], ["expect", "send"])
        self.assertTrue(result["lazy"], result)
        self.assertTrue(result["checkerModule"].startswith(target + os.sep), result)
        # Twisted itself still comes from the virtualenv, not the target.
        self.assertFalse(result["twisted"].startswith(target), result)

        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "twisted.trial", "mtlsproxy_example"],
            env=env, path=run, reactor=reactor,
        )
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
