# -*- test-case-name: tests.test_logs -*-
"""
Tests for L{mtlsproxy.logs} and the C{--log-format} option.
"""

from __future__ import annotations

import io
import json
import os
import signal

from twisted.logger import LogLevel, Logger, eventFromJSON
from twisted.python import usage
from twisted.python.logfile import LogFile
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtlsproxy.config import LoggingConfig
from mtlsproxy.logs import (
    TwistdObserverFactory,
    jsonLinesObserver,
    shippable,
    twistdLogger,
    workerTextObserver,
)
from mtlsproxy.tap import Options


def _event(**fields: object) -> dict[str, object]:
    event: dict[str, object] = {
        "log_format": "Listener {listener} up",
        "log_level": LogLevel.info,
        "log_namespace": "mtlsproxy.service",
        "log_time": 1700000000.25,
        "log_logger": Logger(),
        "log_source": object(),
        "listener": "web",
    }
    event.update(fields)
    return event


class ShippableTests(SynchronousTestCase):
    """
    L{shippable} and L{jsonLinesObserver}.
    """

    def test_operationalEvent(self) -> None:
        """
        When an event has no log_category, it is marked operational, with
        an ISO timestamp, the level name and the formatted message; live
        objects are left out.
        """
        result = shippable(_event())
        self.assertEqual(result["log_category"], "operational")
        self.assertEqual(result["timestamp"], "2023-11-14T22:13:20.250Z")
        self.assertEqual(result["level"], "info")
        self.assertEqual(result["message"], "Listener web up")
        self.assertNotIn("log_logger", result)
        self.assertNotIn("log_source", result)

    def test_accessEventKeepsCategory(self) -> None:
        """
        When an event is an access event, log_category stays "access".
        """
        self.assertEqual(shippable(_event(log_category="access"))["log_category"], "access")

    def test_failureInMessage(self) -> None:
        """
        When an event carries a failure, the message has its traceback.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        result = shippable(_event(log_failure=failure, log_level=LogLevel.critical))
        self.assertIn("ZeroDivisionError", result["message"])
        self.assertEqual(result["level"], "critical")

    def test_oneObjectPerLine(self) -> None:
        """
        When events are observed, each is one line of JSON that
        eventFromJSON reads back, with the fields as data.
        """
        out = io.StringIO()
        observer = jsonLinesObserver(out)
        observer(_event())
        observer(_event(log_category="access", listener="line\nbreak"))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual((first["listener"], first["log_category"]), ("web", "operational"))
        self.assertEqual((second["listener"], second["log_category"]), ("line\nbreak", "access"))
        self.assertEqual(eventFromJSON(lines[0])["log_level"], LogLevel.info)


class _Parent(dict):  # type: ignore[type-arg]
    """
    Stands for twistd's options.
    """


class ObserverFactoryTests(SynchronousTestCase):
    """
    L{TwistdObserverFactory}: which observer twistd gets.
    """

    def setUp(self) -> None:
        # Opening a log file installs a SIGUSR1 handler (rotation), as twistd does.
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)

    def factory(self, logFormat: str | None = None, logging: LoggingConfig | None = None,
                **twistd: object) -> TwistdObserverFactory:
        options = Options()
        options["log-format"] = logFormat
        if logging is not None:
            options.loggingConfig = logging  # type: ignore[attr-defined]
        return TwistdObserverFactory(options, _Parent(twistd))

    def test_textDefaultIsTwistds(self) -> None:
        """
        When nothing asks for JSON, a file or a level above debug, the
        factory makes twistd's usual text observer itself: to standard
        output with -n, else to twistd's --logfile, which it keeps as
        C{logFile} (rotated as twistd's: it is a LogFile).
        """
        out = io.StringIO()
        self.patch(__import__("sys"), "stdout", out)
        factory = self.factory(logging=LoggingConfig(level="debug"), nodaemon=True)
        observer = factory()
        assert observer is not None
        observer(_event())
        self.assertRegex(out.getvalue(), r"^\S+ \[mtlsproxy\.service#info\] Listener web up\n$")
        self.assertIsNone(factory.logFile)

        path = os.path.abspath(self.mktemp())
        factory = self.factory(logging=LoggingConfig(level="debug"), logfile=path)
        observer = factory()
        assert observer is not None and factory.logFile is not None
        self.assertIsInstance(factory.logFile, LogFile)
        self.assertEqual(factory.logFile.path, path)
        observer(_event())
        factory.logFile.write(b"another line\n")
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertRegex(lines[0], r"^\S+ \[mtlsproxy\.service#info\] Listener web up$")
        self.assertEqual(lines[1:], ["another line"])
        self.assertEqual(out.getvalue().count("\n"), 1)

    def test_daemonDefaultFile(self) -> None:
        """
        When twistd runs as a daemon without --logfile or [logging] file,
        the factory opens twistd.log (in the current directory) as its
        C{logFile}.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        factory = self.factory(nodaemon=False)
        factory()
        assert factory.logFile is not None
        self.assertEqual(factory.logFile.path, os.path.join(directory, "twistd.log"))

    def test_workerLogsToStandardOutput(self) -> None:
        """
        When the options are a worker's (--worker I), it logs to standard
        output whatever the file ([logging] file, a daemon's default), with
        no C{logFile}, and ignores SIGUSR1 (its supervisor rotates the
        file); each text line has [worker I] after its namespace and level,
        each JSON line a worker field.
        """
        out = io.StringIO()
        self.patch(__import__("sys"), "stdout", out)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        configFile = os.path.abspath(self.mktemp())
        factory = self.factory(logging=LoggingConfig(file=configFile), nodaemon=True)
        factory.options["worker"] = 1  # type: ignore[index]
        observer = factory()
        assert observer is not None
        self.assertIsNone(factory.logFile)
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_IGN)
        observer(_event())
        self.assertRegex(out.getvalue(), r"^\S+ \[mtlsproxy\.service#info\] \[worker 1\] Listener web up\n$")
        self.assertFalse(os.path.exists(configFile))

        out.truncate(0)
        out.seek(0)
        factory = self.factory("json", nodaemon=False)
        factory.options["worker"] = 0  # type: ignore[index]
        observer = factory()
        assert observer is not None
        self.assertIsNone(factory.logFile)
        observer(_event())
        self.assertFalse(os.path.exists("twistd.log"))
        line = json.loads(out.getvalue())
        self.assertEqual((line["worker"], line["message"]), (0, "Listener web up"))

    def test_workerTextMultiline(self) -> None:
        """
        When a worker's text event has several lines (a traceback), the
        first carries [worker I] and the others keep twistd's tab.
        """
        out = io.StringIO()
        observer = workerTextObserver(out, 3)
        observer(_event(log_format="first\nsecond"))
        self.assertRegex(out.getvalue(), r"^\S+ \[mtlsproxy\.service#info\] \[worker 3\] first\n\tsecond\n$")

    def test_defaultLevelDropsDebug(self) -> None:
        """
        By default (level info) a debug event is dropped before it is
        formatted or written, and an info event is written: to twistd's
        C{--logfile}, as twistd would.
        """
        path = os.path.abspath(self.mktemp())
        observer = self.factory(logfile=path)()
        assert observer is not None
        observer(_event(log_level=LogLevel.debug, log_format="per-connection detail"))
        observer(_event())
        with open(path) as f:
            text = f.read()
        self.assertIn("Listener web up", text)
        self.assertNotIn("per-connection detail", text)

    def test_levelOptionOverridesConfig(self) -> None:
        """
        When --log-level debug is given and [logging] says warn, debug
        events are written; with [logging] level = "warn" alone, info
        events are dropped too (standard output with -n).
        """
        out = io.StringIO()
        self.patch(__import__("sys"), "stdout", out)
        factory = self.factory(logging=LoggingConfig(level="warn"), nodaemon=True)
        self.assertEqual(factory.level(), "warn")
        observer = factory()
        assert observer is not None
        observer(_event())
        observer(_event(log_level=LogLevel.warn, log_format="a warning"))
        self.assertNotIn("Listener web up", out.getvalue())
        self.assertIn("a warning", out.getvalue())
        factory.options["log-level"] = "debug"  # type: ignore[index]
        self.assertEqual(factory.level(), "debug")
        observer = factory()
        assert observer is not None
        observer(_event(log_level=LogLevel.debug, log_format="per-connection detail"))
        self.assertIn("per-connection detail", out.getvalue())

    def test_unattached(self) -> None:
        """
        When the factory was never attached to options, twistd's default is
        used.
        """
        self.assertIsNone(TwistdObserverFactory()())

    def test_jsonToStdout(self) -> None:
        """
        When --log-format json is given with -n, JSON goes to standard
        output.
        """
        out = io.StringIO()
        self.patch(__import__("sys"), "stdout", out)
        observer = self.factory("json", nodaemon=True)()
        assert observer is not None
        observer(_event())
        self.assertEqual(json.loads(out.getvalue())["message"], "Listener web up")

    def test_configFormatAndFile(self) -> None:
        """
        When [logging] says json and a file, JSON lines go to that file.
        """
        path = os.path.abspath(self.mktemp())
        observer = self.factory(logging=LoggingConfig(format="json", file=path))()
        assert observer is not None
        observer(_event())
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["listener"], "web")

    def test_optionOverridesConfig(self) -> None:
        """
        When --log-format text is given and [logging] says json, the format
        is text; twistd's --logfile beats [logging] file.
        """
        twistdFile = os.path.abspath(self.mktemp())
        configFile = os.path.abspath(self.mktemp())
        factory = self.factory("text", LoggingConfig(format="json", file=configFile, level="debug"),
                               logfile=twistdFile)
        self.assertEqual(factory.format(), "text")
        observer = factory()
        assert observer is not None
        observer(_event())
        with open(twistdFile) as f:
            self.assertIn("[mtlsproxy.service#info] Listener web up", f.read())
        self.assertFalse(os.path.exists(configFile))
        os.remove(twistdFile)
        observer = self.factory(None, LoggingConfig(format="json", file=configFile), logfile=twistdFile)()
        assert observer is not None
        observer(_event())
        self.assertTrue(os.path.exists(twistdFile))
        self.assertFalse(os.path.exists(configFile))

    def test_textToConfigFile(self) -> None:
        """
        When [logging] names a file in text format, text lines go there.
        """
        path = os.path.abspath(self.mktemp())
        observer = self.factory(logging=LoggingConfig(file=path))()
        assert observer is not None
        observer(_event())
        with open(path) as f:
            self.assertIn("[mtlsproxy.service#info] Listener web up", f.read())


class OptionsTests(SynchronousTestCase):
    """
    C{twistd mtlsproxy --log-format}.
    """

    def test_badLevel(self) -> None:
        """
        When --log-level is not a level, it is a usage error naming it.
        """
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--config", "x", "--log-level", "verbose"]
        )
        self.assertIn('--log-level must be "debug", "info", "warn" or "error"', str(error))

    def test_badFormat(self) -> None:
        """
        When --log-format is neither text nor json, it is a usage error.
        """
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--config", "x", "--log-format", "xml"]
        )
        self.assertIn('--log-format must be "text" or "json"', str(error))

    def test_installedAsTwistdLogger(self) -> None:
        """
        When parsed as twistd's sub-command without --logger, the options
        name mtlsproxy.logs.twistdLogger as twistd's logger and attach to
        it; with --logger given, they leave it alone.
        """
        self.addCleanup(twistdLogger.attach, None, None)
        options = Options()
        options.parent = _Parent(logger=None)  # type: ignore[attr-defined]
        options.parseOptions(["--config", "x", "--log-format", "json"])
        self.assertEqual(options.parent["logger"], "mtlsproxy.logs.twistdLogger")  # type: ignore[attr-defined]
        self.assertIs(twistdLogger.options, options)

        options = Options()
        options.parent = _Parent(logger="mtlsproxy.logs.jsonLogger")  # type: ignore[attr-defined]
        options.parseOptions(["--config", "x"])
        self.assertEqual(options.parent["logger"], "mtlsproxy.logs.jsonLogger")  # type: ignore[attr-defined]
