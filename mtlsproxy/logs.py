# -*- test-case-name: tests.test_logs -*-
"""
Log observers: human-readable text (twistd's own) or JSON lines for
shipping, to standard output or a file.

twistd starts logging after it built the service and before it starts it,
with the observer that its C{--logger} factory returns (or, when there is
none, one it makes from C{--logfile} / C{--syslog}).  mtlsproxy takes part
in that choice instead of adding a second observer later:

  - C{twistd --logger mtlsproxy.logs.jsonLogger mtlsproxy ...} writes JSON
    lines to standard output; nothing else is needed.
  - Otherwise C{twistd mtlsproxy} names L{twistdLogger} (a
    L{TwistdObserverFactory}) as twistd's C{--logger}, unless one was given
    or C{--syslog}.  When twistd calls it, the configuration has been read, so it can follow
    C{--log-format} and the C{[logging]} table: for plain text to where
    twistd would log anyway it returns L{None}, and twistd makes its usual
    observer (log rotation on SIGUSR1 included); for JSON, or for a
    C{[logging] file}, it returns the observer itself.

In JSON mode every event is one line: L{twisted.logger.eventAsJSON} of the
event's fields (so L{twisted.logger.eventFromJSON} reads it back) plus
C{timestamp} (ISO 8601, UTC), C{level}, C{message} (the formatted text)
and C{log_category}: C{"access"} for the per-connection access events
(L{mtlsproxy.relay}), C{"operational"} for everything else.
"""

from __future__ import annotations

import signal
import sys
from datetime import datetime, timezone
from typing import IO, Any, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import logfile

__all__ = [
    "OPERATIONAL",
    "TwistdObserverFactory",
    "jsonLinesObserver",
    "jsonLogger",
    "shippable",
    "twistdLogger",
]

OPERATIONAL = "operational"
"""
The C{log_category} of every event that is not an access event.
"""

_DROPPED = ("log_logger", "log_source", "log_observer", "log_trace")
"""
Fields that hold live objects, not data (they would be written as
C{{"unpersistable": true}}).
"""


def shippable(event: LogEvent) -> LogEvent:
    """
    The event with the fields a log shipper wants: C{timestamp}, C{level},
    C{message}, C{log_category}; without the fields that are live objects.
    """
    result = {key: value for key, value in event.items() if key not in _DROPPED}
    result.setdefault("log_category", OPERATIONAL)
    when = event.get("log_time")
    if isinstance(when, (int, float)):
        result["timestamp"] = (
            datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    level = event.get("log_level")
    result["level"] = getattr(level, "name", None)
    message = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            message = f"{message}\n{failure.getTraceback()}"
        except Exception:
            pass
    result["message"] = message
    return result


def jsonLinesObserver(outFile: IO[Any]) -> ILogObserver:
    """
    An observer writing each event to C{outFile} as one line of JSON (see
    L{shippable}), flushed after every event.
    """
    return FileLogObserver(outFile, lambda event: eventAsJSON(shippable(event)) + "\n")


def jsonLogger() -> ILogObserver:
    """
    The log observer factory for C{twistd --logger mtlsproxy.logs.jsonLogger}:
    JSON lines on standard output (for journald, docker, a log shipper
    reading the process's output).
    """
    return jsonLinesObserver(sys.stdout)


def _openLogFile(path: str) -> logfile.LogFile:
    """
    Open a log file the way twistd does (rotated at 1 MB and on SIGUSR1).
    """
    logFile = logfile.LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return logFile


class TwistdObserverFactory:
    """
    twistd's C{--logger} for C{twistd mtlsproxy}: chooses the observer from
    C{--log-format}, twistd's C{--logfile} and C{-n}, and the
    configuration's C{[logging]} table (which L{mtlsproxy.tap.makeService}
    stores on the options as C{loggingConfig} before twistd calls this).

    Precedence: C{--log-format} over C{[logging] format}; twistd's
    C{--logfile} over C{[logging] file}; then standard output with C{-n},
    else twistd's C{twistd.log}.

    @ivar options: The C{twistd mtlsproxy} options, or L{None} before
        L{attach}.
    @ivar twistdOptions: twistd's own options (C{logfile}, C{nodaemon}).
    """

    def __init__(self, options: Any = None, twistdOptions: Any = None) -> None:
        self.options = options
        self.twistdOptions = twistdOptions

    def attach(self, options: Any, twistdOptions: Any) -> None:
        """
        Follow these options (C{Options.postOptions} calls this).
        """
        self.options = options
        self.twistdOptions = twistdOptions

    def format(self) -> str:
        """
        C{"text"} or C{"json"}.
        """
        chosen = self.options.get("log-format")
        if chosen:
            return str(chosen)
        config = getattr(self.options, "loggingConfig", None)
        return getattr(config, "format", "text")

    def level(self) -> str:
        """
        The least level logged: C{"debug"}, C{"info"}, C{"warn"} or
        C{"error"} (C{--log-level}, else C{[logging] level}, else info).
        """
        chosen = self.options.get("log-level") if self.options is not None else None
        if chosen:
            return str(chosen)
        config = getattr(self.options, "loggingConfig", None)
        return getattr(config, "level", "info")

    def __call__(self) -> Optional[ILogObserver]:
        """
        The observer, or L{None} to let twistd make its default text one
        (when everything is logged, C{level = "debug"}).

        Below the configured level, events are dropped before they are
        formatted or written: the per-connection debug events (a client
        that closed without close_notify, ...) cost a busy proxy nothing
        then.
        """
        if self.options is None or self.twistdOptions is None:
            return None
        observer = self._observer()
        level = self.level()
        if level == "debug":
            return observer
        if observer is None:
            observer = self._twistdDefault()
        return FilteringLogObserver(
            observer, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))]
        )

    def _twistdDefault(self) -> ILogObserver:
        """
        The text observer twistd would make (its C{UnixAppLogger}): standard
        output for C{--logfile -} and with C{-n} without C{--logfile}, else
        the file (C{twistd.log} by default), rotated as twistd does.
        """
        assert self.twistdOptions is not None
        name = self.twistdOptions.get("logfile")
        if name == "-" or (not name and self.twistdOptions.get("nodaemon")):
            return textFileLogObserver(sys.stdout)
        return textFileLogObserver(_openLogFile(name or "twistd.log"))  # type: ignore[arg-type]

    def _observer(self) -> Optional[ILogObserver]:
        """
        The observer for the chosen format and file, or L{None} for
        twistd's default text one.
        """
        assert self.twistdOptions is not None
        fmt = self.format()
        twistdFile = self.twistdOptions.get("logfile")
        config = getattr(self.options, "loggingConfig", None)
        configFile = getattr(config, "file", None)
        if twistdFile:
            if fmt == "text":
                return None
            if twistdFile == "-":
                return jsonLinesObserver(sys.stdout)
            return jsonLinesObserver(_openLogFile(twistdFile))  # type: ignore[arg-type]
        outFile: Any
        if configFile:
            outFile = _openLogFile(configFile)
        elif fmt == "text":
            return None
        elif self.twistdOptions.get("nodaemon"):
            outFile = sys.stdout
        else:
            outFile = _openLogFile("twistd.log")
        if fmt == "json":
            return jsonLinesObserver(outFile)
        return textFileLogObserver(outFile)


twistdLogger = TwistdObserverFactory()
"""
What C{twistd mtlsproxy} names as twistd's C{--logger}
(C{"mtlsproxy.logs.twistdLogger"}).  A module-level object because twistd
takes its logger as a dotted name, which it imports; the options are
attached to it when they are parsed.
"""
