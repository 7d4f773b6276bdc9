"""What every ``shmkeyspace`` command shares: the error type, exit codes, the
environment lookup, opening a Reader, and the output formatting.

Promises (for cli.py and the command modules): a :class:`CliError` is reported
as one line on stderr with its exit code; ``--json`` output is lossless (bytes as
``{"base64": ...}``: :func:`jsonable`); tables are plain text, one row a line.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import AbstractSet, Any, Dict, List, Optional, Sequence

from .errors import ShmKeyspaceError

PROG = "shmkeyspace"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
ENV = "SHMKEYSPACE_"


class CliError(ShmKeyspaceError):
    """An error reported as one line on stderr (exit code ``code``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    v = os.environ.get(ENV + name)
    return v if v not in (None, "") else default


def describe(exc: BaseException) -> str:
    from .errors import ShmKeyspaceError

    msg = str(exc).strip()
    if (
        isinstance(
            exc,
            (ShmKeyspaceError, ConnectionError, ValueError, FileNotFoundError, PermissionError, ImportError),
        )
        and msg
    ):
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def open_reader(name: str) -> Any:
    from .reader import Reader

    return Reader(name)


def jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else json.dumps(jsonable(k))): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)  # msgpack ext types and the like


def entry_json(e: Any) -> Dict[str, Any]:
    return {
        "key": jsonable(e.key),
        "value": jsonable(e.decoded),
        "create_revision": e.create_revision,
        "mod_revision": e.mod_revision,
        "version": e.version,
        "lease": e.lease,
    }


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


def summarize(value: Any, width: int = 60) -> str:
    """A one-line, truncated rendering of a decoded value for tables."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        try:
            text = b.decode("utf-8")
            s = text if text.isprintable() else repr(text)
        except UnicodeDecodeError:
            s = repr(b)
    elif isinstance(value, str):
        s = value if value.isprintable() else repr(value)
    else:
        try:
            s = json.dumps(jsonable(value), separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            s = repr(value)
    return s if len(s) <= width else s[: width - 1] + "…"


def key_text(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)


def print_table(entries: List[Any], total: Optional[int]) -> None:
    rows = [("KEY", "MOD_REV", "VER", "VALUE")]
    for e in entries:
        rows.append((key_text(e.key), str(e.mod_revision), str(e.version), summarize(e.decoded)))
    print_rows(rows, right={1, 2})
    if total is not None:
        more = total - len(entries)
        print(
            f"({total} entr{'y' if total == 1 else 'ies'}" + (f", {more} not shown" if more else "") + ")",
            file=sys.stderr,
        )


def print_rows(rows: Sequence[Sequence[str]], right: AbstractSet[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [(c.rjust(widths[i]) if i in right else c.ljust(widths[i])) for i, c in enumerate(r)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
