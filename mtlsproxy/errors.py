# -*- test-case-name: tests.test_config -*-
"""
The one error type for everything wrong with a configuration.

Reading the TOML file, validating its structure, loading certificates, keys
and CRLs and the start-up checks all raise L{ConfigurationError}, so the
console script, C{twistd} and a reload have one thing to catch and print.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import date, datetime, time

__all__ = ["ConfigurationError", "describeValue", "joinKey"]

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def joinKey(prefix: str | None, key: str | None) -> str | None:
    """
    Join two parts of a key path.

    C{joinKey("listeners[0]", "certificates[1].key")} is
    C{"listeners[0].certificates[1].key"}; an index part (starting with
    C{"["}) is appended without a dot, and a missing part is left out.

    @return: The joined key path, or L{None} if both parts are missing.
    """
    if not prefix:
        return key or None
    if not key:
        return prefix
    if key.startswith("["):
        return prefix + key
    return f"{prefix}.{key}"


def _oneLine(text: str) -> str:
    """
    Fold line breaks (and the blanks around them) into single spaces, so
    that a message stays one line whatever a library's message looked like.
    """
    return _LINE_BREAKS.sub(" ", text).strip()


class ConfigurationError(Exception):
    """
    Something is wrong with the configuration or the files it names.

    C{str()} is one line, C{"<file>: <key path>: <problem>"}, leaving out
    the parts that are not known, for example::

        /etc/mtlsproxy.toml: listeners[0].certificates[0].key: file not found: /etc/pki/server.key

    For a TOML syntax error the key path is replaced by the line number::

        /etc/mtlsproxy.toml: line 7: Invalid value (column 12)

    @ivar problem: What is wrong and, where it helps, what was expected.
    @ivar path: The configuration file, or L{None} if not known (yet).
    @ivar key: The key path inside the file, such as
        C{listeners[1].client_auth}, or L{None} for the whole file.
    @ivar line: The line of a TOML syntax error, or L{None}.
    """

    def __init__(
        self,
        problem: str,
        path: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(problem, path, key, line)
        self.problem = problem
        self.path = path
        self.key = key
        self.line = line

    def __str__(self) -> str:
        parts: list[str] = []
        if self.path:
            parts.append(self.path)
        if self.key:
            parts.append(self.key)
        if self.line is not None:
            parts.append(f"line {self.line}")
        parts.append(self.problem)
        return _oneLine(": ".join(parts))

    def __repr__(self) -> str:
        return (
            f"ConfigurationError(problem={self.problem!r}, path={self.path!r},"
            f" key={self.key!r}, line={self.line!r})"
        )

    def within(self, prefix: str | None) -> ConfigurationError:
        """
        The same error with its key path taken relative to C{prefix}.

        Validators of a nested table know only their own key
        (C{"client_auth"}); whoever knows where the table sits in the file
        (C{"listeners[1]"}) re-raises C{error.within("listeners[1]")}.
        """
        return ConfigurationError(
            self.problem, self.path, joinKey(prefix, self.key), self.line
        )

    def inFile(self, path: str) -> ConfigurationError:
        """
        The same error naming C{path} as its file, unless it names one
        already.
        """
        if self.path:
            return self
        return ConfigurationError(self.problem, path, self.key, self.line)


def describeValue(value: object) -> str:
    """
    Describe a TOML value for an error message: strings quoted, other
    scalars with their TOML type, tables and arrays by kind only
    (C{'"5s"'}, C{"integer 5"}, C{"an array"}).  The configuration loader
    and checker plugins (their L{OptionError}s) share it.
    """
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, bool):
        return "boolean " + ("true" if value else "false")
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        if math.isnan(value):
            return "float nan"
        if math.isinf(value):
            return "float " + ("inf" if value > 0 else "-inf")
        return f"float {value!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, datetime):
        return f"date-time {value.isoformat()}"
    if isinstance(value, date):
        return f"date {value.isoformat()}"
    if isinstance(value, time):
        return f"time {value.isoformat()}"
    return repr(value)
