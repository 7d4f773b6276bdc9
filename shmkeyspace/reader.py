"""Reader: lock-free point and range queries on a published snapshot.

A Reader maps the control segment and the current data generation read-only
and answers from them without locks, syscalls or talking to etcd (see the
seqlock protocol in ``segment.py``). It promises:

* every answer comes from exactly one published snapshot (never a torn one);
  readers retry, never wait, when the writer overwrites what they were reading;
* a writer that grows into a new generation is followed transparently;
* memory or shapes that are not a valid snapshot raise CorruptSegmentError,
  never a wrong answer; a retry loop that keeps failing is bounded.

Lifetimes: ``Reader`` is a context manager; ``close()`` unmaps deterministically.
Entries are immutable tuples; their ``decoded`` values are fresh objects per call,
except for the small per-reader cache of repeated ``get`` answers (valid for one
publication), whose values callers must not mutate. A Reader is safe to use
across ``fork()`` (mappings are inherited) but not from several threads at once.
"""

from __future__ import annotations

import os
import time
from functools import partial
from operator import add
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

from xxhash import xxh3_64_intdigest

from . import feed, futex, segment
from .derived import Derived, Deriver
from .errors import (
    ChangesTooOldError,
    CorruptSegmentError,
    SegmentNotFoundError,
    ShmKeyspaceError,
    SnapshotExpiredError,
    UntrustedSegmentError,
)
from .key_values import prefix_end
from .snapshot import ImageView
from .snapshot import unpackb as _unpackb

Key = Union[str, bytes]

_new = tuple.__new__
# What reading garbage can raise (unpacker errors are ValueErrors); a read that
# raises one of these is retried if the writer moved, else reported as corrupt.
_READ_ERRORS = (CorruptSegmentError, ValueError, TypeError, IndexError, KeyError, OverflowError)
_MAX_RETRIES = 10_000
_COPY_AFTER = 3  # retries of a query before it runs on a private copy of the image


class Entry(NamedTuple):
    """One mirrored key: the decoded value and etcd's revisions for it."""

    key: Key
    decoded: Any
    create_revision: int
    mod_revision: int
    version: int
    lease: int


_make_entry = partial(_new, Entry)  # Entry from a 6-item list, no Python frame


class Health(NamedTuple):
    """What :meth:`Reader.health` reports."""

    name: str
    writer_alive: bool
    writer_pid: int
    heartbeat_age: Optional[float]  # seconds since the writer's last heartbeat
    revision: int  # revision of the published snapshot
    etcd_revision: int  # newest etcd revision the writer has heard of
    lag: int  # etcd_revision - revision (0 when idle: see README)
    keys: int
    bytes: int  # size of the published image
    generation: int
    published_at: float  # wall-clock time of the publication
    seq: int
    #: "disk": restored from the writer's state file and not yet caught up with
    #: etcd (fail static); "etcd": current with etcd; "unknown": the writer
    #: does not say (an older writer, or none has published since it started).
    source: str = "unknown"


def _to_query(key: Key):
    """(raw bytes, the form entries store the key in)."""
    if type(key) is str:
        return key.encode("utf-8"), key
    if isinstance(key, (bytes, bytearray, memoryview)):
        kb = bytes(key)
        try:
            return kb, kb.decode("utf-8")
        except UnicodeDecodeError:
            return kb, kb
    raise TypeError(f"key must be str or bytes, not {type(key).__name__}")


class _Closed:
    """Stands in for the seq words of a closed Reader: any read raises."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, i: int) -> int:
        raise ShmKeyspaceError(f"Reader of {self.name!r} is closed")


class _Pub:
    """One publication as this reader mapped it."""

    __slots__ = ("seq", "view", "data", "revision", "gen")

    def __init__(self, seq: int, view: ImageView, data: segment.DataView, revision: int, gen: int):
        self.seq, self.view, self.data, self.revision, self.gen = seq, view, data, revision, gen


class Reader:
    """Attach to the snapshot published under ``name`` on this host.

    ``wait`` seconds: how long to wait for a first publication if there is none
    yet (default: fail at once with SegmentNotFoundError).
    ``cache_size``: decoded entries kept for repeated ``get`` within one
    publication (0: off). The cache is this process's private memory, so it is
    kept small: 256 hot keys cost ~0.1-0.4 MB, where 4096 cost 3-7 MB per reader
    (bench/results, memory).
    ``writer_uid`` (a uid or user name; default ``$SHMKEYSPACE_WRITER_UID``): the
    uid whose writer to trust besides root and this process's own; a snapshot
    owned by anyone else, or writable by anyone but its owner, raises
    UntrustedSegmentError (README, "Security").
    """

    def __init__(
        self, name: str, *, wait: float = 0.0, cache_size: int = 256, writer_uid: Union[int, str, None] = None
    ) -> None:
        self.name = segment.validate_name(name)
        deadline = time.monotonic() + wait
        while True:
            try:
                self._ctrl: Optional[segment.ControlView] = segment.ControlView(name, writer_uid)
                if self._ctrl.words[segment.OFF_SEQ // 8] >= 2:
                    break
                self._ctrl.close()
                raise SegmentNotFoundError(f"snapshot {name!r} has no publication yet (writer loading?)")
            except SegmentNotFoundError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        self._words: Any = self._ctrl.words
        #: The uid owning the snapshot's segments (checked at attach, see trust.py).
        self.owner_uid: int = self._ctrl.owner_uid
        self._seq_addr = self._ctrl.seq_address()
        self._deriver: Optional[Deriver] = None
        self._data: Optional[segment.DataView] = None
        self._pub: Optional[_Pub] = None
        self._view: Optional[ImageView] = None
        self._pub_seq = -1
        self._cache: dict = {}
        self._cache_seq = -1
        self._cache_size = cache_size
        self._fence = segment.NEEDS_FENCE
        self._pid = os.getpid()
        #: Reads redone because the writer published under them (for tests/metrics).
        self.retries = 0
        self._current()  # map the current publication (retrying if it moves under us)

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Unmap everything. Idempotent; the Reader is unusable afterwards."""
        if self._pub is not None:
            self._pub.view.release()
            self._pub = None
        if self._data is not None:
            self._data.close()
            self._data = None
        self._view = None
        self._pub_seq = self._cache_seq = -1
        if self._ctrl is not None:
            self._words = _Closed(self.name)
            self._seq_addr = 0
            self._ctrl.close()
            self._ctrl = None
        self._cache = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- publication tracking -------------------------------------------------------
    def _refresh(self, s1: int) -> _Pub:
        """Map and validate the publication named by seq value ``s1``."""
        if self._ctrl is None:
            raise ShmKeyspaceError(f"Reader of {self.name!r} is closed")
        gen, seg_size, off, length, revision, count, _, _ = self._ctrl.record((s1 >> 1) & 1)
        if gen == 0:
            raise CorruptSegmentError(f"snapshot {self.name!r}: publication record is empty")
        data = self._data
        if data is None or data.gen != gen:
            data = segment.DataView(self.name, gen, seg_size, owner_uid=self._ctrl.owner_uid)
            # Views into the old generation may still serve a SnapshotView; the
            # mapping goes when the last of them does (DataView.close).
            # Forget the old publication's seq too: if validation below fails and
            # a (hostile) seq word goes back to it, _current must not return None.
            self._pub = None
            self._pub_seq = -1
            if self._data is not None:
                self._data.close()
            self._data = data
        view = ImageView(data.buf, off, length)
        if view.revision != revision or view.count != count:
            raise CorruptSegmentError("publication record disagrees with its snapshot header")
        self._pub = _Pub(s1, view, data, revision, gen)
        self._view = view
        self._pub_seq = s1
        return self._pub

    def _current(self) -> "tuple[int, _Pub]":
        """(s1, publication) for a new read, following the writer if it moved."""
        for _ in range(_MAX_RETRIES):
            s1 = self._words[2]
            if self._fence:
                segment.fence()
            if s1 == self._pub_seq and self._pub is not None:
                return s1, self._pub
            try:
                pub = self._refresh(s1)
            except (CorruptSegmentError, SegmentNotFoundError, UntrustedSegmentError):
                # Untrusted too: a stale record may name a generation already
                # unlinked and re-created by someone else; only a current one counts.
                if self._moved(s1):
                    self.retries += 1
                    continue
                raise
            if self._moved(s1):
                self.retries += 1
                continue
            return s1, pub
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable publication after {_MAX_RETRIES} tries")

    def _moved(self, s1: int) -> bool:
        """True if the buffer read under ``s1`` may have been overwritten since."""
        if self._fence:
            segment.fence()
        return self._words[2] - (s1 & ~1) > 2

    # -- queries ---------------------------------------------------------------------
    def get(self, key: Key) -> Optional[Entry]:
        """The entry of ``key`` or None. O(1): one hash probe and one unpack.

        The fast path is a seq load, the probe, and a second seq load; anything
        unusual (a new publication, a retry, an error) takes :meth:`_consistent`.
        """
        words = self._words
        s1 = words[2]
        if s1 == self._cache_seq:
            try:  # a subscript, not .get(): no method call on the hottest path
                return self._cache[key]
            except KeyError:
                pass
            except TypeError:  # unhashable: let _get_slow name the problem
                return self._get_slow(key)
        if s1 == self._pub_seq and not self._fence:
            try:
                e = _lookup(self._view, key)  # type: ignore[arg-type]  # set whenever _pub_seq is
            except _READ_ERRORS:
                return self._get_slow(key)
            if words[2] == s1:
                if self._cache_size:
                    if self._cache_seq != s1 or len(self._cache) >= self._cache_size:
                        self._cache = {}
                        self._cache_seq = s1
                    self._cache[key] = e
                return e
        return self._get_slow(key)

    def _get_slow(self, key: Key) -> Optional[Entry]:
        if not isinstance(key, (str, bytes, bytearray, memoryview)):
            raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
        return self._consistent(_lookup, key)

    def __getitem__(self, key: Key) -> Entry:
        e = self.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def __contains__(self, key: Key) -> bool:
        return self.get(key) is not None

    def range(self, from_key: Key, to_key: Optional[Key]) -> List[Entry]:
        """Entries with ``from_key <= key < to_key`` in key order (``to_key=None``: to the end)."""
        lo = _to_query(from_key)[0]
        hi = None if to_key is None else _to_query(to_key)[0]
        return self._consistent(_range, lo, hi)

    def prefixed(self, prefix: Key) -> List[Entry]:
        """Entries whose key starts with ``prefix``, in key order."""
        p = _to_query(prefix)[0]
        return self._consistent(_range, p, prefix_end(p))

    def __len__(self) -> int:
        return self._consistent(lambda v: v.count)

    @property
    def revision(self) -> int:
        """Revision of the snapshot currently published (see KeySpace.header)."""
        return self._consistent(lambda v: v.revision)

    def _consistent(self, fn, *args):
        for attempt in range(_MAX_RETRIES):
            s1, pub = self._current()
            if attempt >= _COPY_AFTER:
                # A query slower than two publications (a 100k-key prefixed()
                # under steady churn) would retry forever: copy the image once
                # (one memcpy, far shorter) and answer from the private copy.
                img = self._copy_image(s1, pub)
                if img is None:
                    continue
                try:
                    return fn(ImageView(memoryview(img), 0, len(img)), *args)
                except _READ_ERRORS as exc:
                    raise CorruptSegmentError(f"snapshot {self.name!r}: {exc}") from None
            try:
                out = fn(pub.view, *args)
            except _READ_ERRORS as exc:
                if self._moved(s1):
                    self.retries += 1
                    continue
                raise CorruptSegmentError(f"snapshot {self.name!r}: {exc}") from None
            if not self._moved(s1):
                return out
            self.retries += 1
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable read after {_MAX_RETRIES} tries")

    def snapshot(self, copy: bool = False) -> "SnapshotView":
        """A view of one publication for several queries (a context manager).

        Queries on the view raise SnapshotExpiredError once the writer has recycled
        its buffer (two publications later); ``copy=True`` takes a private copy of
        the image instead, which never expires.
        """
        for _ in range(_MAX_RETRIES):
            s1, pub = self._current()
            if not copy:
                return SnapshotView(self, s1, pub.view, None)
            img = self._copy_image(s1, pub)
            if img is None:
                continue
            return SnapshotView(self, s1, ImageView(memoryview(img), 0, len(img)), img)
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable read after {_MAX_RETRIES} tries")

    def _copy_image(self, s1: int, pub: _Pub) -> Optional[bytes]:
        """A private copy of ``pub``'s image (one memcpy); None if the writer moved meanwhile."""
        img = bytes(pub.view.buf)
        if self._moved(s1):
            self.retries += 1
            return None
        return img

    # -- waiting and health ----------------------------------------------------------
    def wait_for_revision(self, revision: int, timeout: Optional[float] = None) -> bool:
        """Sleep until the published revision is >= ``revision``; False on timeout.

        Sleeps in the kernel on the shared seq word (futex.py), which the writer
        wakes after each publication: the waiter runs ~0.1 ms after a publication
        and costs no CPU while idle (bench/bench_feed.py). Each sleep lasts at most
        1 s, so a dead writer never holds a waiter past ``timeout`` and a restarted
        one is followed. Where futexes are unavailable it polls the seq word (one
        8-byte load), backing off from 0.5 to 4 ms. Reads the publication record,
        not the image: cheap enough to call in a loop.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = -1
        delay = 0.0005
        while True:
            s = self._words[2]
            if s != seen:
                seen = s
                if self._record_revision() >= revision:
                    return True
                delay = 0.0005
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
            if futex.wait(self._seq_addr, s, 1.0 if left is None else min(left, 1.0)):
                continue
            time.sleep(delay if left is None else min(delay, left))
            delay = min(0.004, delay * 2)

    def _seq_word(self) -> int:
        return self._words[2]

    def _record_revision(self) -> int:
        """The published revision, from the publication record (no image mapping)."""
        assert self._ctrl is not None
        for _ in range(_MAX_RETRIES):
            s1 = self._words[2]
            if self._fence:
                segment.fence()
            rev = self._ctrl.record((s1 >> 1) & 1)[4]
            if not self._moved(s1):
                return rev
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable record after {_MAX_RETRIES} tries")

    # -- change feed, watch, derived state ------------------------------------------------
    def changes(self, since_revision: int) -> feed.Changes:
        """Keys changed in ``(since_revision, revision]``: a key-ordered list (feed.Changes).

        Deleted keys are included; keys come in :attr:`Entry.key`'s form. The result's
        ``revision`` attribute is the published revision it is complete up to (pass it
        as the next ``since_revision``). Raises ChangesTooOldError when the writer's
        bounded log no longer reaches back to ``since_revision`` or a load/reload lies
        in between. Cost: ~20 us for 100 keys (bench/bench_feed.py), independent of
        the snapshot's size.
        """
        since = int(since_revision)
        for _ in range(_MAX_RETRIES):
            s1, pub = self._current()
            assert self._ctrl is not None
            rec = self._ctrl.record((s1 >> 1) & 1)
            try:
                out = feed.read_changes(
                    pub.data.buf, rec[2] + segment.feed_offset(rec[3]), rec[7], since, pub.revision
                )
            except _READ_ERRORS as exc:
                if self._moved(s1):
                    self.retries += 1
                    continue
                raise CorruptSegmentError(f"snapshot {self.name!r}: {exc}") from None
            except ChangesTooOldError:
                if self._moved(s1):
                    self.retries += 1
                    continue
                raise
            if not self._moved(s1):
                return out
            self.retries += 1
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable read after {_MAX_RETRIES} tries")

    def watch(
        self, prefix: Optional[Key] = None, since: Optional[int] = None, *, timeout: Optional[float] = None
    ) -> Iterator[Tuple[int, feed.Changes]]:
        """Iterate ``(revision, keys)`` as publications change keys under ``prefix``.

        Starts after ``since`` (default: the current revision). Each item holds every
        key under ``prefix`` changed in (previous revision, ``revision``], in key
        order; publications that touched no key under ``prefix`` yield nothing, and
        a slow consumer gets several publications merged into one item. Raises
        ChangesTooOldError when it fell further behind than the writer's feed keeps
        (or the writer reloaded): catch it, read the current snapshot, and watch
        again from its revision. ``timeout``: end the iteration when nothing arrives
        for that many seconds (default: never). Sleeps in the kernel between items.
        """
        return feed.watch(self, prefix, since, timeout)

    def derive(self, fn: Callable[["SnapshotView"], Any]) -> Derived:
        """``fn(view)`` for the current publication, computed at most once per revision.

        Returns ``Derived(revision, value)``. Thread-safe: concurrent callers during
        a computation wait for it and share its value. The cache holds one value
        per ``fn`` (by identity) for the latest revision asked about; a cached answer
        costs one seq load. See derived.py.
        """
        d = self._deriver
        if d is None:
            d = self._deriver = Deriver(self, self._seq_word)
        return d.get(fn)

    def health(self, stale_after: Optional[float] = None) -> Health:
        """Writer liveness and publication facts (one flock probe: not for hot paths).

        ``stale_after``: heartbeat age, in seconds, past which a writer counts as
        dead even if its lock is held (default: 5 heartbeat intervals, at least 2 s).
        """
        w = self._words
        pid = w[segment.OFF_PID // 8]
        hb = w[segment.OFF_HEARTBEAT // 8]
        interval = w[segment.OFF_HB_INTERVAL // 8] / 1e9 or 0.5
        age = (time.monotonic_ns() - hb) / 1e9 if hb else None
        limit = stale_after if stale_after is not None else max(2.0, 5 * interval)
        alive = pid != 0 and segment.writer_is_running(self.name) and age is not None and age < limit
        s1, pub = self._current()
        assert self._ctrl is not None  # _current raised if closed
        rec = self._ctrl.record((s1 >> 1) & 1)
        etcd_rev = w[segment.OFF_ETCD_REV // 8]
        return Health(
            self.name,
            alive,
            pid,
            age,
            pub.revision,
            etcd_rev,
            max(0, etcd_rev - pub.revision),
            pub.view.count,
            rec[3],
            pub.gen,
            rec[6] / 1e9,
            s1,
            segment.SOURCE_NAMES.get(w[segment.OFF_SOURCE // 8], "unknown"),
        )


class SnapshotView:
    """One publication, for several consistent queries. See :meth:`Reader.snapshot`."""

    def __init__(self, reader: Reader, seq: int, view: ImageView, private: Optional[bytes]) -> None:
        self._reader = reader
        self._seq = seq
        self._view = view
        self._private = private
        self.revision = view.revision

    def _check(self, out):
        if self._private is None and self._reader._moved(self._seq):
            raise SnapshotExpiredError(
                f"snapshot view of {self._reader.name!r} at revision {self.revision} expired: the writer "
                "reused its buffer; keep views short or use snapshot(copy=True)"
            )
        return out

    def _run(self, fn, *args):
        try:
            out = fn(self._view, *args)
        except _READ_ERRORS as exc:
            self._check(None)
            raise CorruptSegmentError(f"snapshot {self._reader.name!r}: {exc}") from None
        return self._check(out)

    def get(self, key: Key) -> Optional[Entry]:
        return self._run(_lookup, key)

    def range(self, from_key: Key, to_key: Optional[Key]) -> List[Entry]:
        return self._run(_range, _to_query(from_key)[0], None if to_key is None else _to_query(to_key)[0])

    def prefixed(self, prefix: Key) -> List[Entry]:
        p = _to_query(prefix)[0]
        return self._run(_range, p, prefix_end(p))

    def __len__(self) -> int:
        return self._view.count

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._run(_range, b"", None))

    def close(self) -> None:
        if self._private is not None:
            self._view.release()

    def __enter__(self) -> "SnapshotView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the query kernels, on one ImageView ------------------------------------------------


def _lookup(view: ImageView, key: Key) -> Optional[Entry]:
    if type(key) is str:
        kb = key.encode("utf-8")
        kq = key
    else:
        kb, kq = _to_query(key)
    h = xxh3_64_intdigest(kb) or 1
    table = view.table
    mask = view.mask
    i = (h & mask) << 1
    sh = table[i]
    probes = 0
    while sh:
        if sh == h:
            ol = table[i + 1]
            off = ol & 0xFFFFFFFF
            end = off + (ol >> 32)
            if end > view.arena_len:
                raise CorruptSegmentError(f"hash slot {i >> 1} points outside the arena")
            base = view.arena_base
            lst = _unpackb(view.src[base + off : base + end])  # parse a copy, never shared memory
            if lst[0] == kq:
                if len(lst) != 6:
                    raise CorruptSegmentError(f"entry at offset {off} has {len(lst)} fields, expected 6")
                return _new(Entry, lst)
        probes += 1
        if probes > mask:  # a full table can only be a corrupt one
            raise CorruptSegmentError("hash table has no empty slot")
        i = (i + 2) & (mask << 1 | 1)
        sh = table[i]
    return None


def _range(view: ImageView, lo: bytes, hi: Optional[bytes]) -> List[Entry]:
    i = view.lower_bound(lo)
    j = view.count if hi is None else view.lower_bound(hi)
    if j <= i:
        return []
    order = view.order
    offs = order[2 * i : 2 * j : 2].tolist()
    lens = order[2 * i + 1 : 2 * j : 2].tolist()
    start = offs[0]
    total = sum(lens)
    src, base = view.src, view.arena_base  # slices of src are private copies (ImageView doc)
    n = j - i
    if offs[-1] + lens[-1] - start == total and offs == sorted(offs):
        # Entries lie back to back in key order (the arena is compacted in key
        # order): unpack them as one msgpack array, in C.
        if start + total > view.arena_len:
            raise CorruptSegmentError("range runs past the arena")
        lists = _unpackb(b"\xdd" + n.to_bytes(4, "big") + src[base + start : base + start + total])
    else:
        if max(map(add, offs, lens)) > view.arena_len:
            raise CorruptSegmentError("range entry lies outside the arena")
        lists = [_unpackb(src[base + o : base + o + m]) for o, m in zip(offs, lens)]
    if len(lists) != n:
        raise CorruptSegmentError("range unpacked to the wrong number of entries")
    # C-level checks and construction: a Python call per entry was 40 % of a range.
    if set(map(len, lists)) - {6}:
        raise CorruptSegmentError("range holds an entry without exactly 6 fields")
    return list(map(_make_entry, lists))
