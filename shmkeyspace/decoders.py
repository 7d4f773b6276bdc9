"""Ready-made decoders: ``decoder(kv) -> decoded`` over a raw :class:`KeyValue`.

A decoder raises to reject a value (the key is then logged and left out); what it
returns must be msgpack-serializable, since readers receive it through shared memory.
``resolve("json")`` or ``resolve("package.module:function")`` gives one by name.
"""

from __future__ import annotations

import importlib
import json as _json
import re
from typing import Any, Callable

import msgpack as _msgpack

from .errors import InvalidSettingError
from .key_values import KeyValue


def raw(kv: KeyValue) -> bytes:
    """The value's bytes, unchanged."""
    return kv.value


_json_decode = _json.JSONDecoder().decode


def utf8(kv: KeyValue) -> str:
    """The value as UTF-8 text (rejects other bytes)."""
    return kv.value.decode("utf-8")


def _json_std(kv: KeyValue) -> Any:
    # str input skips json.loads' per-call encoding sniffing (~5 us a key).
    return _json_decode(kv.value.decode("utf-8"))


# orjson (the writer extra) parses ~110 B objects 2.7x faster (3.7 -> 1.4 us, measured).
# Imported at the first JSON value, not with this module: the CLI imports this module
# before a warm start publishes, and orjson's import is ~12 ms of that path.
_orjson_loads: Any = None  # None: not imported yet; False: not installed


def _load_orjson() -> Any:
    global _orjson_loads
    loads: Any
    try:
        from orjson import loads
    except ImportError:  # pragma: no cover - orjson missing: the standard library only
        loads = False
    _orjson_loads = loads
    return loads


# orjson turns integers beyond 64 bits into floats where json keeps an int: any
# run of 19+ digits (also in strings or float mantissas, harmlessly) goes to the
# standard parser. The search costs ~0.2 us on a ~110 B value.
_long_digits = re.compile(rb"[0-9]{19}").search


def json(kv: KeyValue) -> Any:
    """The value parsed as JSON (UTF-8, as etcd tools write it).

    With orjson installed it parses first; whatever orjson refuses (NaN,
    lone surrogates, ...) or might read differently (integers of 19+ digits)
    goes to the standard library's parser, so the result, or the error, is
    always json.loads's.
    """
    v = kv.value
    loads = _orjson_loads
    if loads is None:
        loads = _load_orjson()
    if loads and not _long_digits(v):
        try:
            return loads(v)
        except ValueError:
            pass
    return _json_std(kv)


def msgpack(kv: KeyValue) -> Any:
    """The value unpacked as msgpack."""
    return _msgpack.unpackb(kv.value)


# What these return is always readable by the readers' unpacker (bytes, str, or
# JSON: str keys only, ints that pack at all unpack, nesting json.loads accepts
# unpacks; measured to 900 levels), so the writer skips pack_entry's round trip
# for them. msgpack is not marked: msgpack maps may have int keys.
for _d in (raw, utf8, json):
    setattr(_d, "msgpack_safe", True)  # noqa: B010 (a function attribute mypy would refuse)

BUILTIN = {"raw": raw, "utf8": utf8, "json": json, "msgpack": msgpack}


def resolve(spec: str) -> Callable[[KeyValue], Any]:
    """A decoder by builtin name or ``module:function``; ValueError says what is wrong."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise InvalidSettingError(f"decoder {spec!r}: use one of {', '.join(BUILTIN)} or module:function")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InvalidSettingError(f"decoder {spec!r}: cannot import module {mod_name!r}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise InvalidSettingError(f"decoder {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn
