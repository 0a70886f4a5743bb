# -*- test-case-name: tests.test_workers,tests.test_logs,tests.test_plugins -*-
"""
The twistd plugin's options and service maker: C{twistd mtlsproxy --config FILE}.

This module only turns options into a checked configuration object and that
object into a service.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any, Optional

from twisted.logger import Logger
from twisted.python import usage

from .errors import ConfigurationError

_log = Logger()


class Options(usage.Options):
    """
    Command-line options for C{twistd mtlsproxy}.
    """

    synopsis = "--config FILE"
    longdesc = (
        "Run the mtlsproxy TCP/TLS proxy and load balancer described by a TOML"
        " configuration file.  Check a file without running it with"
        " 'mtlsproxy check --config FILE'."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
        [
            "log-format",
            None,
            None,
            'Log format, "text" or "json" (one JSON object per line); default the'
            " configuration's [logging] format, else text.",
        ],
        [
            "log-level",
            None,
            None,
            'The least level logged: "debug", "info", "warn" or "error"; default the'
            " configuration's [logging] level, else info.",
        ],
        [
            "workers",
            None,
            None,
            'Worker processes, N (1 to 256) or "auto" (one per CPU core): overrides the'
            " configuration's workers.",
        ],
        ["worker", None, None, "(internal) Run as worker process N of a supervisor (workers > 1)."],
        ["supervisor", None, None, "(internal) The supervisor's process id, with --worker."],
        ["inherit", None, None, "(internal) The listening sockets a worker inherits, with --worker."],
        [
            "status-socket",
            None,
            None,
            "(internal) With --worker: the private UNIX socket where the worker serves its"
            " status site to the supervisor.",
        ],
        [
            "drained",
            None,
            None,
            "(internal) With --worker: the pool members to drain before accepting clients,"
            ' JSON [["POOL", "ADDRESS:PORT"], ...] (the drains the supervisor remembers).',
        ],
        [
            "health-channel",
            None,
            None,
            "(internal) With --worker: share active health checks with the other workers"
            " through the supervisor: standard input from it, this file descriptor to it.",
        ],
        [
            "health-states",
            None,
            None,
            "(internal) With --worker and --health-channel: the members' health as the"
            " supervisor remembers it, JSON, applied before accepting clients.",
        ],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if self["log-format"] not in (None, "text", "json"):
            raise usage.UsageError(
                f'--log-format must be "text" or "json", not {self["log-format"]!r}'
            )
        if self["log-level"] not in (None, "debug", "info", "warn", "error"):
            raise usage.UsageError(
                '--log-level must be "debug", "info", "warn" or "error",'
                f' not {self["log-level"]!r}'
            )
        if self["workers"] is not None:
            self["workers"] = _workersOption(self["workers"])
        if self["drained"] is not None:
            from .workers import decodeDrained

            if self["worker"] is None:
                raise usage.UsageError("--drained is only for a worker (--worker)")
            try:
                self["drained"] = decodeDrained(self["drained"])
            except ValueError as e:
                raise usage.UsageError(str(e))
        if self["health-channel"] is not None:
            if self["worker"] is None:
                raise usage.UsageError("--health-channel is only for a worker (--worker)")
            try:
                self["health-channel"] = int(self["health-channel"])
                if self["health-channel"] < 3:
                    raise ValueError(self["health-channel"])
            except ValueError:
                raise usage.UsageError(
                    f"--health-channel must be a file descriptor above 2, not {self['health-channel']!r}"
                )
        if self["health-states"] is not None:
            from .healthshare import decodeVerdicts

            if self["health-channel"] is None:
                raise usage.UsageError("--health-states is only for a worker with --health-channel")
            try:
                self["health-states"] = decodeVerdicts(self["health-states"])
            except ValueError as e:
                raise usage.UsageError(f"--health-states: {e}")
        if self["worker"] is not None:
            from .workers import decodeInherited

            try:
                self["worker"] = int(self["worker"])
                self["supervisor"] = int(self["supervisor"])
                self["inherit"] = decodeInherited(self["inherit"] or "")
            except (TypeError, ValueError) as e:
                raise usage.UsageError(f"--worker needs --supervisor PID and --inherit: {e}")
        # Choose twistd's log observer once the configuration is read (see
        # mtlsproxy.logs), unless twistd was told where to log otherwise.
        twistdOptions = getattr(self, "parent", None)
        if twistdOptions is not None and not twistdOptions.get("logger") and not twistdOptions.get(
            "syslog"
        ):
            from .logs import twistdLogger

            twistdLogger.attach(self, twistdOptions)
            twistdOptions["logger"] = "mtlsproxy.logs.twistdLogger"


def quietRepeatedStopSignals(reactor: Any) -> None:
    """
    Make a second C{SIGTERM} or C{SIGINT} while the proxy is already
    stopping (draining its connections) a logged no-op.

    Twisted's handlers call C{reactor.stop()} again, which raises
    C{ReactorNotRunning} and logs a traceback in the middle of the drain
    (an operator pressing Ctrl-C twice, a supervisor that repeats its
    signal).  The drain goes on either way; C{SIGKILL} ends it at once.
    The reactor reads C{sigInt} and C{sigTerm} when it installs its
    handlers (in C{run}), so this must be called before.
    """
    for name in ("sigInt", "sigTerm"):
        original = getattr(reactor, name, None)
        if original is None:
            continue

        def handler(number: int, frame: Any = None, original: Any = original) -> None:
            if getattr(reactor, "_stopped", False):
                _log.warn(
                    "Received signal {signal} while already stopping: the drain goes on"
                    " (SIGKILL stops at once)",
                    signal=number,
                )
                return
            original(number, frame)

        setattr(reactor, name, handler)


def _workersOption(text: str) -> int | str:
    """
    The value of C{--workers}: an integer from 1 to 256 or C{"auto"}.

    @raise usage.UsageError: For anything else.
    """
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 256:
        raise usage.UsageError(f'--workers must be an integer from 1 to 256 or "auto", not {text!r}')
    return value


def _workersService(options: Options, reactor: Any, loaded: Any) -> Any:
    """
    With C{workers} more than 1 (and not a worker ourselves), the
    L{mtlsproxy.workers.WorkerSupervisor} that runs the workers, serving
    C{[status]} for all of them (L{mtlsproxy.fanin}) if configured;
    otherwise L{None}: this process serves the listeners.

    @raise ConfigurationError: For the status endpoint's TLS material.
    """
    from functools import partial

    from .workers import WorkerSupervisor, exitWithParent, workerArguments, workerCount

    if options["worker"] is not None:
        exitWithParent()
        return None
    config = loaded.config
    count = workerCount(options["workers"] if options["workers"] is not None else config.workers)
    if count <= 1:
        return None
    from .logs import twistdLogger

    def logFile() -> Any:
        # The file twistd's observer (made after this service, before it
        # starts) writes to, when it is ours (see mtlsproxy.logs): the
        # workers' lines go into it.
        return twistdLogger.logFile if twistdLogger.options is options else None

    supervisor = WorkerSupervisor(
        reactor,
        [(listener.name, listener.endpoint) for listener in config.listeners],
        count,
        partial(workerArguments, getattr(options, "parent", None), options, workers=count),
        drainTimeout=config.drain_timeout,
        statusSockets=config.status is not None,
        logFile=logFile,
    )
    if config.status is not None:
        from .fanin import supervisorStatusService
        from .status import loadStatusMaterial

        # The workers log the material's warnings; the supervisor only needs it.
        material, _ = loadStatusMaterial(config, datetime.now(timezone.utc))
        supervisorStatusService(reactor, supervisor, config.status, material).setServiceParent(
            supervisor
        )
    return supervisor


def _supervisorChannel(reactor: Any, fd: Optional[int]) -> Any:
    """
    With C{--health-channel FD}, what connects a worker's health sharing to
    its supervisor (L{mtlsproxy.healthshare.connectToSupervisor} on C{FD});
    else L{None}.
    """
    if fd is None:
        return None
    from functools import partial

    from .healthshare import connectToSupervisor

    return partial(connectToSupervisor, reactor, fd=fd)


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    Load and check the configuration and build the proxy service.

    A configuration error is printed as one line on standard error and ends
    the process with status 1: no traceback for a typo.
    """
    from .checks import checkConfiguration
    from .config import loadConfig
    from .service import ProxyService

    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
        quietRepeatedStopSignals(reactor)
    try:
        config = loadConfig(options["config"])
        loaded = checkConfiguration(config, datetime.now(timezone.utc))
        service = _workersService(options, reactor, loaded)
        if service is None:
            # The status endpoint's material and the admin console's key files
            # are read here too.
            service = ProxyService(
                reactor,
                loaded,
                inherited=options["worker"] is not None and options["inherit"] or None,
                workerIndex=options["worker"],
                statusSocket=options["status-socket"] if options["worker"] is not None else None,
                workerCount=(options["workers"] or 1) if options["worker"] is not None else 1,
                drained=(options["drained"] or ()) if options["worker"] is not None else (),
                shareHealth=options["health-channel"] is not None,
                healthStates=options["health-states"] or (),
                connectSupervisor=_supervisorChannel(reactor, options["health-channel"]),
            )
            if options["worker"] is not None:
                from .workers import ParentWatcher

                ParentWatcher(reactor, options["supervisor"]).setServiceParent(service)
    except ConfigurationError as e:
        sys.stderr.write(f"mtlsproxy: configuration error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1)
    for warning in loaded.warnings:
        sys.stderr.write(f"mtlsproxy: warning: {warning}\n")
    # For mtlsproxy.logs.TwistdObserverFactory, which twistd calls next.
    options.loggingConfig = config.logging  # type: ignore[attr-defined]
    return service
