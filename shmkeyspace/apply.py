"""The writer's compiled apply path: KeySpace.apply's event loop in C for the built-in decoders.

Owns :class:`CompiledApply`, what a :class:`~shmkeyspace.store.PackedStore`
runs a batch of watch responses through when its writer's decoder is one of
``decoders.raw`` (or none), ``utf8``, ``json`` (with orjson installed) or
``msgpack``, and the extension is built. It promises:

* the same outcome as the Python loop in :meth:`KeySpace.apply`, which stays
  the reference: the same pending changes (byte-identical packed entries, so
  byte-identical images), the same changed keys and header revision, the same
  keys left out, and the same log records in the same order (stale
  mod_revision, delete of a missing key, key outside root: through the
  KeySpace's own messages; a decode failure: through the KeySpace's own
  decode of that event). ``tests/test_apply_paths.py`` checks this on random
  event streams;
* one C call per batch of responses (``_speedups.apply_events``): event fields
  are read straight from the client's protobuf message, the value is decoded
  (orjson, msgpack's unpacker) and packed into the entry in C, the key's
  current mod_revision is read from the pending batch or the builder's table;
* whatever the C loop does not take itself (a value that fails to decode or
  pack, a type its packer does not know, a JSON value with a run of 19+ digits)
  goes to the Python path's decode of that one event: failures cost what they
  cost before, and their outcome is the reference's by construction;
* custom decoders, and installs without the extension, keep the Python loop
  (:func:`compiled_kind` returns None).

Which path a writer uses: ``Writer(apply_impl=...)``, else the environment's
``SHMKEYSPACE_APPLY`` ("c" or "python"), else "c" where available. Cost
measured in ``bench/scenarios/apply_paths.py``.

Locking: runs under the KeySpace lock (inside KeySpace.apply), like the store.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Optional, Set, Tuple

from . import decoders
from .reader import compiled

#: The kinds apply_events decodes itself (the numbers are _speedups.c's K_*).
KINDS = {"raw": 0, "utf8": 1, "json": 2, "msgpack": 3}
#: Apply paths this installation offers: "c" needs the extension.
IMPLEMENTATIONS: Tuple[str, ...] = ("c", "python") if compiled is not None else ("python",)


def default_impl() -> str:
    """``SHMKEYSPACE_APPLY`` if set to an offered path, else "c" where built, else "python"."""
    env = os.environ.get("SHMKEYSPACE_APPLY", "")
    if env in IMPLEMENTATIONS:
        return env
    return IMPLEMENTATIONS[0]


def compiled_kind(decoder: Optional[Callable[..., Any]]) -> Optional[str]:
    """The built-in decoder kind ``decoder`` is (None: the writer's default, raw), or None.

    None also when the kind cannot be compiled here: json without orjson (its
    fast path is orjson's; the standard library's parser stays in Python).
    """
    if decoder is None or decoder is decoders.raw:
        return "raw"
    if decoder is decoders.utf8:
        return "utf8"
    if decoder is decoders.msgpack:
        return "msgpack"
    if decoder is decoders.json:
        return "json" if _orjson_loads() is not None else None
    return None


def _orjson_loads() -> Any:
    try:
        from orjson import loads
    except ImportError:  # pragma: no cover - orjson missing: json stays in Python
        return None
    return loads


class CompiledApply:
    """The C event loop bound to one decoder kind (see module doc). Cheap to build."""

    __slots__ = ("kind", "_code", "_fns")

    def __init__(self, kind: str) -> None:
        if compiled is None:
            raise RuntimeError("the compiled apply path needs shmkeyspace._speedups")
        import msgpack
        import ormsgpack

        self.kind = kind
        self._code = KINDS[kind]
        # (orjson.loads, msgpack.unpackb, ormsgpack.unpackb): the json decoder's
        # parser, the msgpack decoder's, and pack_entry's verify (the readers' unpacker).
        self._fns = (_orjson_loads(), msgpack.unpackb, ormsgpack.unpackb)

    def __call__(
        self,
        responses: Tuple[Any, ...],
        root_key: bytes,
        floor: int,
        pending: dict,
        builder: Any,
        excluded: Set[bytes],
        slow: Callable[[Any], Any],
        skip: Callable[[int, bytes, int, int], None],
        changed: Set[bytes],
        revision: int,
    ) -> int:
        """Apply the events of ``responses``; returns the new revision. One C call."""
        table, arena = builder.lookup_buffers()
        return compiled.apply_events(
            responses,
            root_key,
            floor,
            pending,
            table,
            arena,
            excluded,
            self._code,
            self._fns,
            slow,
            skip,
            changed,
            revision,
        )

    def pack_one(self) -> Callable[..., Optional[bytes]]:
        """``pack(key, value, create, mod, version, lease)``: :meth:`pack` bound, for a load's loop."""
        return partial(compiled.pack_value, self._code, self._fns)

    def pack(
        self, key: bytes, value: bytes, create: int, mod: int, version: int, lease: int
    ) -> Optional[bytes]:
        """The entry the C loop packs for one put, or None where it defers to Python (tests)."""
        return compiled.pack_value(self._code, self._fns, key, value, create, mod, version, lease)
