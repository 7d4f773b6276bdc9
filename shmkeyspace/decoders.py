"""Ready-made decoders: ``decoder(kv) -> decoded`` over a raw :class:`KeyValue`.

A decoder raises to reject a value (the key is then logged and left out); what it
returns must be msgpack-serializable, since readers receive it through shared memory.
``resolve("json")`` or ``resolve("package.module:function")`` gives one by name.
"""

from __future__ import annotations

import importlib
import json as _json
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


def json(kv: KeyValue) -> Any:
    """The value parsed as JSON (UTF-8, as etcd tools write it)."""
    # str input skips json.loads' per-call encoding sniffing (~5 us a key).
    return _json_decode(kv.value.decode("utf-8"))


def msgpack(kv: KeyValue) -> Any:
    """The value unpacked as msgpack."""
    return _msgpack.unpackb(kv.value)


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
