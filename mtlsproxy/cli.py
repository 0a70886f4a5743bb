# -*- test-case-name: tests.test_cli -*-
"""
The C{mtlsproxy} console script.

C{mtlsproxy check --config FILE} runs exactly what the proxy runs at start-up
(L{mtlsproxy.config.loadConfig} and L{mtlsproxy.checks.checkConfiguration})
without listening, so a configuration can be checked before a deployment or
a reload.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Callable, Sequence

from .errors import ConfigurationError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    """
    The argument parser: one sub-command per job.
    """
    parser = argparse.ArgumentParser(
        prog="mtlsproxy",
        description="Tools for the mtlsproxy TCP/TLS proxy.  Run the proxy itself"
        " with 'twistd mtlsproxy --config FILE'.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="check a configuration file and the files it names",
        description="Load a configuration file and run the start-up checks on it"
        " (files parse, keys match certificates, CRLs are signed by a configured"
        " CA, certificates are valid now) without starting the proxy.  Exit status"
        " 0 if it is usable, 1 if not.",
    )
    check.add_argument(
        "--config", "-c", required=True, metavar="FILE", help="the TOML configuration file"
    )
    return parser


def check(path: str, now: datetime) -> int:
    """
    Check the configuration file at C{path}, print the outcome and return
    the exit status.

    Warnings go to standard error as C{warning: ...} lines; success prints
    C{configuration OK: N listeners, M pools} on standard output; a
    L{ConfigurationError} prints its one line on standard error.

    @return: 0 if the configuration is usable, 1 if not.
    """
    from .checks import checkConfiguration
    from .config import loadConfig

    try:
        loaded = checkConfiguration(loadConfig(path), now)
    except ConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    config = loaded.config
    print(
        f"configuration OK: {_count(len(config.listeners), 'listener')},"
        f" {_count(len(config.pools), 'pool')}"
    )
    return 0


def _count(number: int, noun: str) -> str:
    """
    C{"1 listener"}, C{"2 listeners"}.
    """
    return f"{number} {noun}{'' if number == 1 else 's'}"


def main(
    argv: Sequence[str] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> int:
    """
    Run the C{mtlsproxy} command line.

    @param argv: The arguments after the program name; default
        C{sys.argv[1:]}.
    @param now: Returns the current time (tests pass a fixed one).

    @return: The exit status: 0 success, 1 a configuration error, 2 a usage
        error.
    """
    try:
        arguments = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:
        # argparse has printed the usage or the help already.
        return e.code if isinstance(e.code, int) else 2
    if arguments.command == "check":
        return check(arguments.config, now())
    raise AssertionError(f"unhandled command {arguments.command!r}")  # pragma: no cover
