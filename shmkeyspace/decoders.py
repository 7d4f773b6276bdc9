"""Ready-made decoders: ``decoder(kv) -> decoded`` over a raw :class:`KeyValue`.

A decoder raises to reject a value (the key is then logged and left out); what it
returns must be msgpack-serializable, since readers receive it through shared memory.
``resolve("json")`` or ``resolve("package.module:function")`` gives one by name;
``struct(Type)`` (or ``resolve("struct:package.module:Type")``) validates values
against a msgspec Struct (the ``typed`` extra), for readers' ``Reader.typed(Type)``.
"""

from __future__ import annotations

import importlib
import json as _json
import re
from typing import Any, Callable

import msgpack as _msgpack

from .errors import ExtraMissingError, InvalidSettingError
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
STRUCT_FORMATS = ("json", "msgpack")


def _import_msgspec() -> Any:
    try:
        import msgspec
    except ImportError:
        raise ExtraMissingError("typed values need msgspec: pip install 'shmkeyspace[typed]'") from None
    return msgspec


def struct(type_: Any, format: str = "json") -> Callable[[KeyValue], Any]:
    """A decoder that validates each value as ``type_`` (a msgspec Struct, or any type
    msgspec decodes into), parsed from ``format`` ("json" or "msgpack").

    A value that does not parse, or does not fit the type, raises (msgspec's
    ValidationError or DecodeError): the writer logs it and leaves the key out, as
    for any decoder. What it returns is the value in msgspec's builtin form
    (``msgspec.to_builtins``: a dict of the Struct's field names, bytes kept), which
    untyped readers get as that dict and ``Reader.typed(type_)`` as a ``type_``.

    Its name (``decoder.__module__:decoder.__qualname__``, what a Writer records in
    its state file) is the command line's spec, ``struct:MODULE:QUALNAME`` (with
    ``:msgpack`` appended for that format), so a writer started either way
    accepts the other's state file.
    """
    if format not in STRUCT_FORMATS:
        raise InvalidSettingError(f"struct decoder format must be one of {STRUCT_FORMATS}, not {format!r}")
    msgspec = _import_msgspec()
    try:
        dec = (msgspec.json if format == "json" else msgspec.msgpack).Decoder(type_)
    except TypeError as exc:
        raise InvalidSettingError(f"struct decoder: msgspec cannot decode into {type_!r}: {exc}") from None
    decode = dec.decode
    to_builtins = msgspec.to_builtins
    keep = (bytes, bytearray, memoryview)  # msgpack carries bytes as bin (to_builtins: base64)

    def decoder(kv: KeyValue) -> Any:
        return to_builtins(decode(kv.value), builtin_types=keep)

    # The value's type gives the name; the writer's _callable_name joins these two.
    decoder.__module__ = "struct"
    decoder.__qualname__ = (
        f"{getattr(type_, '__module__', '?')}:{getattr(type_, '__qualname__', type_)!s}"
        + (":msgpack" if format == "msgpack" else "")
    )
    decoder.__name__ = decoder.__qualname__
    decoder.struct_type = type_  # type: ignore[attr-defined]
    return decoder


def _resolve_struct(spec: str) -> Callable[[KeyValue], Any]:
    # struct:MODULE:QUALNAME[:FORMAT]
    parts = spec.split(":")
    fmt = "json"
    if len(parts) == 4 and parts[3] in STRUCT_FORMATS:
        fmt = parts.pop()
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise InvalidSettingError(
            f"decoder {spec!r}: use struct:MODULE:TYPE or struct:MODULE:TYPE:FORMAT ({'|'.join(STRUCT_FORMATS)})"
        )
    _, mod_name, qual = parts
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InvalidSettingError(f"decoder {spec!r}: cannot import module {mod_name!r}: {exc}") from None
    for attr in qual.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            raise InvalidSettingError(f"decoder {spec!r}: module {mod_name!r} has no type {qual!r}")
    return struct(obj, fmt)


def resolve(spec: str) -> Callable[[KeyValue], Any]:
    """A decoder by builtin name or ``module:function``; ValueError says what is wrong."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("struct:"):
        return _resolve_struct(spec)
    if ":" not in spec:
        raise InvalidSettingError(
            f"decoder {spec!r}: use one of {', '.join(BUILTIN)}, module:function or struct:module:Type"
        )
    return resolve_function(spec, "decoder")


def resolve_function(spec: str, what: str) -> Callable[..., Any]:
    """The callable ``module:function`` names (a decoder, a transform); InvalidSettingError says what is wrong."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise InvalidSettingError(f"{what} {spec!r}: use module:function")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InvalidSettingError(f"{what} {spec!r}: cannot import module {mod_name!r}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise InvalidSettingError(f"{what} {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn
