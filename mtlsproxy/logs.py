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
    C{--log-format} and the C{[logging]} table.  It always makes the
    observer itself, text as twistd's own or JSON, to where twistd would log
    or to C{[logging] file}, and keeps the log file it opened (rotated as
    twistd's: 1 MB and C{SIGUSR1}) as C{logFile}: with worker processes
    the supervisor writes its workers' lines into that very file
    (L{mtlsproxy.workers}).
  - In a worker process (C{--worker I}) it logs to standard output, which
    is the supervisor's or a pipe to it, never to a file, and marks every
    line with the worker's index: a C{worker} field in JSON, C{[worker I]}
    after the C{[namespace#level]} of a text line.

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
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python import logfile

__all__ = [
    "OPERATIONAL",
    "TwistdObserverFactory",
    "jsonLinesObserver",
    "jsonLogger",
    "shippable",
    "twistdLogger",
    "workerTextObserver",
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


def jsonLinesObserver(outFile: IO[Any], worker: Optional[int] = None) -> ILogObserver:
    """
    An observer writing each event to C{outFile} as one line of JSON (see
    L{shippable}), flushed after every event.

    @param worker: In a worker process, its index, written as the C{worker}
        field of every line.
    """
    if worker is None:
        return FileLogObserver(outFile, lambda event: eventAsJSON(shippable(event)) + "\n")

    def format(event: LogEvent) -> str:
        fields = shippable(event)
        fields["worker"] = worker
        return eventAsJSON(fields) + "\n"

    return FileLogObserver(outFile, format)


def workerTextObserver(outFile: IO[Any], worker: int) -> ILogObserver:
    """
    twistd's text observer (L{textFileLogObserver}) for worker process
    C{worker}: each line is C{TIMESTAMP [namespace#level] [worker I] text},
    so that a line keeps the format of the supervisor's own.
    """
    tag = f"[worker {worker}] "

    def format(event: LogEvent) -> Optional[str]:
        text = formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))
        if text is None:
            return None
        # The time stamp never has "] ": the first one ends the system.
        head, separator, rest = text.partition("] ")
        return head + separator + tag + rest if separator else tag + text

    return FileLogObserver(outFile, format)


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

    In a worker process (C{--worker I}) the destination is always standard
    output (see L{mtlsproxy.workers}): its supervisor owns the log file.

    @ivar options: The C{twistd mtlsproxy} options, or L{None} before
        L{attach}.
    @ivar twistdOptions: twistd's own options (C{logfile}, C{nodaemon}).
    @ivar logFile: The log file (L{logfile.LogFile}) the observer last made
        writes to, or L{None} when it writes to standard output.  The
        supervisor of worker processes writes their lines into it.
    """

    def __init__(self, options: Any = None, twistdOptions: Any = None) -> None:
        self.options = options
        self.twistdOptions = twistdOptions
        self.logFile: Optional[logfile.LogFile] = None

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
        The observer; L{None} (twistd makes its default one) only when never
        attached to options.

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
        return FilteringLogObserver(
            observer, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))]
        )

    def _destination(self) -> Optional[str]:
        """
        The log file's path, or L{None} for standard output: twistd's
        C{--logfile} (C{-} is standard output), else C{[logging] file},
        else standard output with C{-n}, else twistd's C{twistd.log}; a
        worker's is always standard output.
        """
        assert self.twistdOptions is not None
        if self.options.get("worker") is not None:
            return None
        twistdFile = self.twistdOptions.get("logfile")
        if twistdFile:
            return None if twistdFile == "-" else str(twistdFile)
        configFile = getattr(getattr(self.options, "loggingConfig", None), "file", None)
        if configFile:
            return str(configFile)
        if self.twistdOptions.get("nodaemon"):
            return None
        return "twistd.log"

    def _observer(self) -> ILogObserver:
        """
        The observer for the chosen format and destination (remembering the
        log file it opened as L{logFile}).
        """
        path = self._destination()
        worker = self.options.get("worker")
        outFile: Any
        if path is None:
            self.logFile = None
            outFile = sys.stdout
            if worker is not None:
                _ignoreRotation()
        else:
            self.logFile = outFile = _openLogFile(path)
        if self.format() == "json":
            return jsonLinesObserver(outFile, worker)
        if worker is not None:
            return workerTextObserver(outFile, worker)
        return textFileLogObserver(outFile)


def _ignoreRotation() -> None:
    """
    In a worker process: ignore C{SIGUSR1} (unless something handles it).
    Its supervisor owns and rotates the log file; a C{SIGUSR1} sent to the
    whole process group or cgroup (C{systemctl kill -s USR1}) must not end
    the workers, which is what the signal does by default.
    """
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


twistdLogger = TwistdObserverFactory()
"""
What C{twistd mtlsproxy} names as twistd's C{--logger}
(C{"mtlsproxy.logs.twistdLogger"}).  A module-level object because twistd
takes its logger as a dotted name, which it imports; the options are
attached to it when they are parsed.
"""
