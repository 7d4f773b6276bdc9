"""What a Reader's queries answer: :class:`Entry`, :class:`Health`, and the views.

Owns the answer types (:class:`Entry`, one mirrored key; :class:`Health`, what
``Reader.health`` reports) and the two views a Reader hands out:
:class:`SnapshotView` (``Reader.snapshot``: one publication for several queries)
and :class:`TypedView` (``Reader.typed``: msgspec-typed values, msgspec imported
only then). Promises: a view answers from exactly one publication, or raises
(SnapshotExpiredError once the writer reused its buffer, ReaderClosedError once
its Reader closed); never a torn or mixed answer.

The views get what they need of their Reader's seqlock side as callables at
construction (reader.py owns the seqlock retry), so this module imports no
reader code, and reader.py re-exports everything here.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

from . import segment
from .errors import (
    CorruptSegmentError,
    ExtraMissingError,
    InvalidKeyError,
    InvalidSettingError,
    ReaderClosedError,
    SnapshotExpiredError,
    ValueTypeError,
)
from .key_values import prefix_end
from .snapshot import ImageView, query_key

Key = Union[str, bytes]

_new = tuple.__new__
#: What the contents of shared memory can make a query kernel raise: its own
#: CorruptSegmentError and the unpacker's ValueErrors. A read that raises one of
#: these is retried if the writer moved, else reported as corrupt; anything else
#: (TypeError, KeyError, ...) is a bug in the reader and surfaces as itself.
READ_ERRORS = (CorruptSegmentError, ValueError)


class Entry(NamedTuple):
    """One mirrored key: the decoded value and etcd's revisions for it."""

    key: Key
    decoded: Any
    create_revision: int
    mod_revision: int
    version: int
    lease: int


make_entry = partial(_new, Entry)  # Entry from a 6-item list, no Python frame


class Health(NamedTuple):
    """What :meth:`Reader.health` reports."""

    name: str
    writer_alive: bool
    writer_pid: int
    heartbeat_age: Optional[float]  # seconds since the writer's last heartbeat
    revision: int  # revision of the published snapshot
    etcd_revision: int  # newest etcd revision the writer has heard of
    lag: int  # etcd_revision - revision (>= 0; 0 when idle: see README)
    keys: int
    bytes: int  # size of the published image
    generation: int
    published_at: float  # wall-clock time of the publication
    seq: int
    #: "disk": restored from the writer's state file and not yet caught up with
    #: etcd (fail static); "etcd": current with etcd; "unknown": the writer
    #: does not say (an older writer, or none has published since it started).
    source: str = "unknown"
    #: Seconds since the writer last heard from etcd; None if it has not yet (or
    #: is a writer that does not track contact).
    etcd_contact_age: Optional[float] = None
    #: True when the writer is dead, or has not heard from etcd for longer than
    #: its --stale-after (see README "Staleness").
    stale: bool = False
    #: The inode of the writer's PID namespace (0: not known, an older writer). When
    #: it differs from this process's (segment.pid_namespace()), ``writer_pid`` is
    #: a pid in another namespace (a container), not one of this process's.
    writer_pidns: int = 0
    #: The history epoch: raised when a writer publishes a snapshot that does not
    #: continue the previous one's history (etcd recreated or restored from a
    #: backup, then a full load). ``revision`` never decreases within one epoch.
    epoch: int = 0
    #: The etcd cluster id the published snapshot came from (0: an older writer).
    cluster_id: int = 0
    #: State files the writer has written, and failed to write (fail static), and
    #: seconds since the last of each (None: none yet).
    persists: int = 0
    persist_failures: int = 0
    persist_age: Optional[float] = None
    persist_failure_age: Optional[float] = None
    #: True while this reader serves a block its writer gave up (removed with
    #: ``unlink``, or lost) and the name has no newer one this reader may follow yet.
    retired: bool = False
    #: The writer's full load: "idle" (none running), "loading", or "waiting" (a
    #: backoff after a slow page or a failed load); keys read by the load running
    #: or the last one, pages asked again, loads started again (cumulative).
    load_state: str = "idle"
    load_keys: int = 0
    load_page_retries: int = 0
    load_restarts: int = 0


class TypedView:
    """``Reader.typed(type_)``: get, range and prefixed answering Entries whose
    ``decoded`` is a ``type_``, for values a writer published with
    ``decoders.struct(type_)`` (or any values that fit ``type_``).

    The query kernels hand over each entry's msgpack bytes (read under one
    publication, like every query) and msgspec decodes them straight into the
    type: no intermediate dict. ``get`` (``ReaderBase._get_decoded`` in C)
    decodes only the value with msgspec; ``range``/``prefixed`` decode all the
    entries as one ``list[tuple[key, type_, int, int, int, int]]``. Measured by
    ``bench/scenarios/typed_values.py`` (100k keys, 5-field Struct, cold gets, C path):
    0.84 us a typed get against 1.07 us for unpacking to a dict then
    ``msgspec.convert`` (0.79x), and 0.80 us for the untyped dict get (1.05x).
    Values are fresh objects per call (no cache). A value that does not fit
    ``type_`` raises ValueTypeError; the Reader's own queries are unaffected.
    """

    def __init__(
        self,
        reader: Any,
        type_: Any,
        *,
        get_decoded: Optional[Callable[..., Optional[Entry]]] = None,
        consistent: Optional[Callable[..., Any]] = None,
        range_raw: Optional[Callable[..., bytes]] = None,
    ) -> None:
        """Made by :meth:`Reader.typed`, which passes its ``_get_decoded`` and
        ``_consistent`` (the seqlock side) and its kernels' ``range_raw``."""
        try:
            import msgspec
        except ImportError:
            raise ExtraMissingError("Reader.typed needs msgspec: pip install 'shmkeyspace[typed]'") from None
        entry = Tuple[Any, type_, int, int, int, int]
        try:
            self._value = msgspec.msgpack.Decoder(type_).decode
            self._one = msgspec.msgpack.Decoder(entry).decode
            self._many = msgspec.msgpack.Decoder(List[entry]).decode
        except TypeError as exc:
            raise InvalidSettingError(f"Reader.typed: msgspec cannot decode into {type_!r}: {exc}") from None
        self._error = msgspec.DecodeError
        self._reader = reader
        assert get_decoded is not None and consistent is not None and range_raw is not None
        self._get_decoded = get_decoded
        self._consistent = consistent
        self._range_raw = range_raw
        # get without a Python frame: the method below, bound (in C when the extension is built).
        self.__dict__["get"] = partial(get_decoded, self._value, self._one, self._fail_key)
        #: The type of the ``decoded`` values this view answers.
        self.type = type_

    def _fail(self, what: str, exc: Exception) -> ValueTypeError:
        return ValueTypeError(
            f"snapshot {self._reader.name!r}: {what} does not decode as {self.type!r}: {exc} "
            "(is its writer's decoder decoders.struct of this type?)"
        )

    def _fail_key(self, key: Key, exc: Exception) -> None:
        if isinstance(exc, self._error):
            raise self._fail(f"the value of key {key!r}", exc) from None
        raise exc

    def get(self, key: Key) -> Optional[Entry]:
        """The entry of ``key`` with a ``type_`` value, or None. O(1).

        (Each view's ``get`` is this, bound in C: ``partial(get_decoded,
        decoder, fail)``, which saves a Python frame per call.)
        """
        return self._get_decoded(self._value, self._one, self._fail_key, key)

    def __getitem__(self, key: Key) -> Entry:
        e = self.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def _entries(self, raw: bytes) -> List[Entry]:
        try:
            return list(map(make_entry, self._many(raw)))
        except self._error as exc:
            raise self._fail("a value in the range", exc) from None

    def range(self, from_key: Key, to_key: Optional[Key]) -> List[Entry]:
        """As :meth:`Reader.range`, with ``type_`` values. O(log n + k)."""
        lo = query_key(from_key)[0]
        hi = None if to_key is None else query_key(to_key)[0]
        return self._entries(self._consistent(self._range_raw, lo, hi))

    def prefixed(self, prefix: Key) -> List[Entry]:
        """As :meth:`Reader.prefixed`, with ``type_`` values. O(log n + k)."""
        p = query_key(prefix)[0]
        return self._entries(self._consistent(self._range_raw, p, prefix_end(p)))


class SnapshotView:
    """One publication, for several consistent queries. See :meth:`Reader.snapshot`."""

    def __init__(
        self,
        reader: Any,
        seq: int,
        words: Any,
        buffers: int,
        view: ImageView,
        kern: Any,
        private: Optional[bytes],
        *,
        impl: Any,
        moved: Callable[[int, Any, int], bool],
    ) -> None:
        """Made by :meth:`Reader.snapshot`, which passes its kernels (``impl``) and
        its seqlock check ``moved(seq, words, lives)``."""
        self._reader = reader
        self._seq = seq
        self._words = words  # the seq words of the block this view's publication is in
        # The writer rotates through ``buffers`` buffers: this view's is rewritten by the
        # publication ``buffers`` after its own, whose odd seq store is seq + 2 * buffers - 1.
        self._lives = 2 * (buffers - 1)
        self._view = view
        self._kern = kern
        self._impl = impl
        self._moved = moved
        self._private = private
        self.revision = view.revision

    def _check(self, out):
        if self._reader.closed:
            raise ReaderClosedError(
                f"snapshot view of {self._reader.name!r} at revision {self.revision}: its Reader is closed"
            )
        if self._private is None and self._moved(self._seq, self._words, self._lives):
            grace = self._words[segment.OFF_VIEW_GRACE // 8] / 1e9
            raise SnapshotExpiredError(
                f"snapshot view of {self._reader.name!r} at revision {self.revision} expired: the writer "
                f"reused its buffer (views are guaranteed {grace:g} s, the writer's --view-grace); keep "
                "views shorter or use snapshot(copy=True)"
            )
        return out

    def _run(self, fn, *args):
        self._check(None)
        try:
            out = fn(self._kern, *args)
        except READ_ERRORS as exc:
            self._check(None)
            raise CorruptSegmentError(f"snapshot {self._reader.name!r}: {exc}") from None
        return self._check(out)

    def get(self, key: Key) -> Optional[Entry]:
        if not isinstance(key, (str, bytes, bytearray, memoryview)):
            raise InvalidKeyError(f"key must be str or bytes, not {type(key).__name__}")
        return self._run(self._impl.lookup, key)

    def range(self, from_key: Key, to_key: Optional[Key]) -> List[Entry]:
        lo = query_key(from_key)[0]
        return self._run(self._impl.range, lo, None if to_key is None else query_key(to_key)[0])

    def prefixed(self, prefix: Key) -> List[Entry]:
        p = query_key(prefix)[0]
        return self._run(self._impl.range, p, prefix_end(p))

    def __len__(self) -> int:
        return self._check(self._view.count)

    def entry_sizes(self) -> List[Tuple[bytes, int]]:
        """``(raw key, bytes its entry takes in the image)`` of every entry, in key order.

        O(n), keys only (no value is decoded): ~1 s at 1M keys. What
        ``shmkeyspace stat --prefixes`` groups (accounting.py).
        """
        return self._run(lambda _kern: self._view.entry_sizes())

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._run(self._impl.range, b"", None))

    def close(self) -> None:
        if self._private is not None:
            self._view.release()

    def __enter__(self) -> "SnapshotView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
