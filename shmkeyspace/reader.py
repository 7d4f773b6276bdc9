"""Reader: lock-free point and range queries on a published snapshot.

A Reader maps the control segment and the current data generation read-only
and answers from them without locks, syscalls or talking to etcd (see the
seqlock protocol in ``segment.py``). It promises:

* every answer comes from exactly one published snapshot (never a torn one);
  readers retry, never wait, when the writer overwrites what they were reading;
* a writer that grows into a new generation is followed transparently;
* memory or shapes that are not a valid snapshot raise CorruptSegmentError,
  never a wrong answer; a retry loop that keeps failing is bounded.

Lifetimes: ``Reader`` is a context manager; ``close()`` unmaps deterministically
when no other thread is inside a query (see the class doc). Entries are
immutable tuples; their ``decoded`` values are fresh objects per call, except for
the small per-reader cache of repeated ``get`` answers (valid for one
publication), whose values callers must not mutate. A Reader is safe to use
across ``fork()`` (mappings are inherited) and from any number of threads at once.

This module is the seqlock retry and the lifetime (the answer types and the
views are in ``views.py``, the kernel loading in ``kernels.py``; both are
re-exported here); the queries themselves are
the kernels of ``snapshot.ImageView`` or, when built, ``_speedups.Image`` (the
same kernels in C) and ``_speedups.ReaderBase.get`` (the hot path of ``get``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

from . import feed, futex, segment, writerlock
from .derived import Derived, Deriver
from .errors import (
    ChangesTooOldError,
    CorruptSegmentError,
    InvalidKeyError,
    InvalidSettingError,
    ReaderClosedError,
    SegmentNotFoundError,
    UntrustedSegmentError,
)
from .kernels import IMPLEMENTATIONS, IMPLS, Impl, compiled
from .key_values import prefix_end
from .snapshot import ImageView, query_key
from .views import READ_ERRORS, Entry, Health, Key, SnapshotView, TypedView

_speedups = compiled
__all__ = [
    "IMPLEMENTATIONS",
    "Entry",
    "Health",
    "Key",
    "Reader",
    "SnapshotView",
    "TypedView",
    "compiled",
]

_new = tuple.__new__
_SEQ = segment.SEQ_WORD
_READ_ERRORS = READ_ERRORS  # (views.py says which errors and why)
_MAX_RETRIES = 10_000
_COPY_AFTER = 3  # retries of a query before it runs on a private copy of the image


class _Closed:
    """Stands in for the seq words of a closed Reader: any read raises."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, i: int) -> int:
        raise ReaderClosedError(f"Reader of {self.name!r} is closed")


class _Pub:
    """One publication as this reader mapped it. Immutable once made, so threads
    can share it: a Reader swaps in a new one with one attribute store.

    ``ctrl`` is the control block it was read under; ``words`` its seq words, or
    None when that block is retired (its writer gave the name up): the fast paths
    then take the slow one, which looks for the name's new block (:meth:`Reader._follow`).
    """

    __slots__ = ("seq", "view", "kern", "data", "revision", "gen", "cache", "ctrl", "words", "ext")

    def __init__(
        self, seq: int, view: Any, kern: Any, data: Any, revision: int, gen: int, ctrl: Any, ext: tuple
    ):
        self.seq, self.view, self.kern, self.data, self.revision, self.gen = (
            seq,
            view,
            kern,
            data,
            revision,
            gen,
        )
        self.ctrl = ctrl
        self.words: Any = None if ctrl is None or ctrl.retired else ctrl.words
        self.ext = ext  # (cluster id, identity, epoch) of this publication
        self.cache: dict = {}  # key -> Entry, answers read under exactly this seq


_NO_PUB = _Pub(-1, None, None, None, 0, 0, None, (0, 0, 0))
#: How often a reader whose block is retired looks for the name's new one (seconds).
_FOLLOW_EVERY = 0.05


# With the extension built, Reader derives from its ReaderBase, whose get() is
# the hot path in C (a cache hit never runs Python) and calls self._get_slow()
# for anything unusual; a Reader(implementation="python") calls _py_get instead.
_Base: Any = _speedups.ReaderBase if _speedups is not None else object


class Reader(_Base):
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
    ``implementation``: "c" or "python" to pick the query kernels; default
    :attr:`Reader.implementation`.

    Threads: one Reader may be shared by any number of threads, with no lock.
    Everything a query uses is read once from ``self._pub``, an immutable
    publication object that a thread following the writer replaces with one
    attribute store; the per-publication cache is a dict (atomic operations).
    ``close()`` only drops references: a query running in another thread keeps
    the mappings it holds alive until it returns (no use-after-unmap), and the
    next query raises ReaderClosedError. ``retries`` is approximate under threads.
    """

    #: "c" when the compiled kernels are built and not switched off with
    #: SHMKEYSPACE_PURE_PYTHON=1, else "python" (see README, "Which read path").
    implementation: str = "c" if "c" in IMPLS else "python"

    def __init__(
        self,
        name: str,
        *,
        wait: float = 0.0,
        cache_size: int = 256,
        writer_uid: Union[int, str, None] = None,
        implementation: Optional[str] = None,
    ) -> None:
        self.name = segment.validate_name(name)
        impl = implementation or type(self).implementation
        if impl not in IMPLS:
            raise InvalidSettingError(f"implementation must be one of {IMPLEMENTATIONS}, not {impl!r}")
        self.implementation = impl
        self._impl: Impl = IMPLS[impl]
        self._writer_uid = writer_uid
        deadline = time.monotonic() + wait
        while True:
            try:
                self._ctrl: Optional[segment.ControlView] = self._open_control()
                break
            except (SegmentNotFoundError, CorruptSegmentError):
                # Corrupt too while waiting: a starting writer creates the control
                # segment empty and sizes it a moment later (seen in the torture
                # test on a loaded machine); past the deadline the error stands.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        # Blocks this reader followed away from: kept mapped until close(), so a
        # thread still reading one never touches unmapped memory.
        self._left: List[segment.ControlView] = []
        self._next_follow = 0.0
        self._epoch_offset = 0  # keeps Health.epoch monotonic across followed blocks
        self._words: Any = self._ctrl.words
        #: The uid owning the snapshot's segments (checked at attach, see trust.py).
        self.owner_uid: int = self._ctrl.owner_uid
        self._seq_addr = self._ctrl.seq_address()
        self._deriver: Optional[Deriver] = None
        self._data: Optional[segment.DataView] = None
        self._pub = _NO_PUB
        self._cache_size = cache_size
        self._fence = segment.NEEDS_FENCE
        #: Reads redone because the writer published under them (for tests/metrics).
        self.retries = 0
        self._compiled = impl == "c"
        if self._compiled:
            self._core_attach(self._words, _SEQ, cache_size)
        self._current()  # map the current publication (retrying if it moves under us)

    def _open_control(self) -> segment.ControlView:
        """The name's control block, if it has a publication and is not retired."""
        ctrl = segment.ControlView(self.name, self._writer_uid)
        if ctrl.words[_SEQ] < 2:
            ctrl.close()
            raise SegmentNotFoundError(f"snapshot {self.name!r} has no publication yet (writer loading?)")
        if ctrl.retired:
            ctrl.close()
            raise SegmentNotFoundError(f"snapshot {self.name!r} was removed; its writer is starting again?")
        return ctrl

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Unmap everything. Idempotent; the Reader and its snapshot views are
        unusable afterwards (ReaderClosedError).

        Mappings go when their last user does: at once when no other thread is
        inside a query (CPython frees them by reference count), else when that
        query returns. A SnapshotView keeps its image mapped until it is dropped.
        """
        self._words = _Closed(self.name)
        self._seq_addr = 0  # futex.wait on 0 fails fast; a sleeping waiter times out (<= 1 s)
        self._pub = _NO_PUB
        if getattr(self, "_compiled", False):
            self._core_close()
        self._data = None
        self._ctrl = None
        self._left = []

    @property
    def closed(self) -> bool:
        return self._ctrl is None

    def _control(self) -> segment.ControlView:
        ctrl = self._ctrl
        if ctrl is None:
            raise ReaderClosedError(f"Reader of {self.name!r} is closed")
        return ctrl

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
    def _refresh(self, s1: int, ctrl: segment.ControlView) -> _Pub:
        """Map and validate the publication named by seq value ``s1`` of ``ctrl``."""
        gen, seg_size, off, length, revision, count, _, _ = ctrl.active_record(s1)
        ext = ctrl.record_ext((s1 >> 1) & 1)
        if gen == 0:
            raise CorruptSegmentError(f"snapshot {self.name!r}: publication record is empty")
        data = self._data
        if data is None or data.gen != gen or data.ctrl_id != ctrl.file_id:
            # The old generation is not closed here: another thread or a
            # SnapshotView may still read it. It is unmapped when its last
            # publication object goes (CPython frees it by reference count).
            data = segment.DataView(self.name, gen, seg_size, owner_uid=ctrl.owner_uid)
            data.ctrl_id = ctrl.file_id
            self._data = data
        view = ImageView(data.buf, off, length)
        if view.revision != revision or view.count != count:
            raise CorruptSegmentError("publication record disagrees with its snapshot header")
        pub = _Pub(s1, view, self._impl.kernel(view), data, revision, gen, ctrl, ext)
        self._pub = pub
        if self._ctrl is None:  # closed by another thread meanwhile: keep nothing mapped
            self._pub = _NO_PUB
            self._data = None
            raise ReaderClosedError(f"Reader of {self.name!r} is closed")
        if self._compiled and pub.words is not None:
            self._core_install(s1, pub.kern, pub.cache, pub.words)
        return pub

    def _current(self) -> "tuple[int, _Pub]":
        """(s1, publication) for a new read, following the writer if it moved."""
        for _ in range(_MAX_RETRIES):
            ctrl = self._control()
            words = ctrl.words
            s1 = words[_SEQ]
            if self._fence:
                segment.fence()
            pub = self._pub
            if s1 == pub.seq and pub.ctrl is ctrl:
                if pub.words is None and self._follow_due():
                    continue  # followed the name to its new block
                return s1, pub
            try:
                pub = self._refresh(s1, ctrl)
            except (CorruptSegmentError, SegmentNotFoundError, UntrustedSegmentError):
                # Any move of seq since s1 counts here, not only _moved()'s "> 2":
                # the writer unlinks the previous generation right after the first
                # publication in the next one (seq = s1 + 2), before it would rewrite
                # a buffer (s1 + 3), so a record read at s1 may already name a
                # vanished generation (8 threads through generation changes saw
                # SegmentNotFoundError). Untrusted too: a vanished generation may have
                # been re-created by someone else. Only an error under a seq that has
                # not moved is the segment's own.
                if self._seq_changed(s1, words):
                    self.retries += 1
                    continue
                if ctrl.retired and self._follow():
                    continue
                raise
            if self._moved(s1, words):
                self.retries += 1
                continue
            return s1, pub
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable publication after {_MAX_RETRIES} tries")

    def _follow_due(self) -> bool:
        """Rate-limited :meth:`_follow` for a reader on a retired block (every 50 ms at most)."""
        now = time.monotonic()
        if now < self._next_follow:
            return False
        self._next_follow = now + _FOLLOW_EVERY
        return self._follow()

    def _follow(self) -> bool:
        """Re-open the name if it now opens another control block; True if this reader moved.

        One stat when nothing moved. A block is followed when it has a
        publication, is not retired, and either its revision is not behind what
        this reader serves or its writer says it is current with etcd (source
        "etcd": a lower revision then means etcd's history was reset, and
        Health.epoch says so). Until then this reader keeps answering from the
        block it has: revisions never go back because a writer restarted from an
        older state file (issue 25). Threads: the swap is attribute stores under
        the GIL; a query running on the old block finishes on it (kept mapped).
        """
        ctrl = self._ctrl
        if ctrl is None:
            return False
        if not ctrl.moved():
            return False
        try:
            new = self._open_control()
        except (SegmentNotFoundError, CorruptSegmentError, UntrustedSegmentError, PermissionError):
            return False
        if new.file_id == ctrl.file_id:
            new.close()
            return False
        old_pub = self._pub
        try:
            s = new.words[_SEQ]
            rev = new.active_record(s)[4]
            ext = new.record_ext((s >> 1) & 1)
        except Exception:
            new.close()
            return False
        source = new.words[segment.OFF_SOURCE // 8]
        reset = old_pub.ctrl is not None and (
            rev < old_pub.revision or (ext[0] and old_pub.ext[0] and ext[0] != old_pub.ext[0])
        )
        if reset and source != segment.SOURCE_ETCD:
            new.close()
            return False
        old_epoch = old_pub.ext[2] + self._epoch_offset
        self._epoch_offset = old_epoch + (1 if reset else 0) - ext[2]
        if self._ctrl is None:  # closed meanwhile
            new.close()
            return False
        self._left.append(ctrl)
        self._ctrl = new
        self.owner_uid = new.owner_uid
        self._words = new.words
        self._seq_addr = new.seq_address()
        self._data = None
        self._pub = _NO_PUB
        if self._compiled:
            self._core_attach(new.words, _SEQ, self._cache_size)
        return True

    def _seq_changed(self, s1: int, words: Any = None) -> bool:
        """True if any publication began since seq was ``s1``."""
        if self._fence:
            segment.fence()
        return (self._words if words is None else words)[_SEQ] != s1

    def _moved(self, s1: int, words: Any = None, lives: int = 2) -> bool:
        """True if the buffer read under ``s1`` may have been overwritten since.

        ``lives``: seq moves the buffer survives, ``2 * (buffers - 1)``; queries use
        2, which holds for any number of buffers (views use their segment's count).
        """
        if self._fence:
            segment.fence()
        return (self._words if words is None else words)[_SEQ] - (s1 & ~1) > lives

    # -- queries ---------------------------------------------------------------------
    def _py_get(self, key: Key) -> Optional[Entry]:
        """The entry of ``key`` or None. O(1): one hash probe and one unpack; a
        repeated key within one publication is one dict lookup.

        The fast path is a seq load, the probe, and a second seq load; anything
        unusual (a new publication, a retry, an error) takes :meth:`_consistent`.
        With the extension built, ``Reader.get`` is ``_speedups.ReaderBase.get``,
        the same steps in C (it calls this method for implementation="python").
        """
        words: Any = self._words
        s1 = words[_SEQ]
        pub = self._pub
        if s1 == pub.seq and pub.words is words:
            try:  # a subscript, not .get(): no method call on the hottest path
                return pub.cache[key]
            except KeyError:
                pass
            except TypeError:  # unhashable: let _get_slow name the problem
                return self._get_slow(key)
            if not self._fence:
                try:
                    lst = pub.kern.lookup(key)
                except _READ_ERRORS:
                    return self._get_slow(key)
                if words[_SEQ] == s1:
                    if lst is None:
                        return None  # absent keys are not cached (see _speedups.c, Base_get)
                    e = _new(Entry, lst)
                    if self._cache_size:
                        cache = pub.cache
                        if len(cache) >= self._cache_size:
                            cache.clear()
                        cache[key] = e
                    return e
        return self._get_slow(key)

    if _speedups is None:
        get = _py_get

    def _get_slow(self, key: Key) -> Optional[Entry]:
        if not isinstance(key, (str, bytes, bytearray, memoryview)):
            raise InvalidKeyError(f"key must be str or bytes, not {type(key).__name__}")
        return self._consistent(self._impl.lookup, key)

    def _get_raw(self, key: Key) -> Optional[bytes]:
        """The msgpack bytes of ``key``'s entry (a private copy read under one
        publication) or None: :meth:`_py_get`'s fast path without the unpack or the cache."""
        if type(key) is not str and not isinstance(key, (bytes, bytearray, memoryview)):
            raise InvalidKeyError(f"key must be str or bytes, not {type(key).__name__}")
        words: Any = self._words
        s1 = words[_SEQ]
        pub = self._pub
        if s1 == pub.seq and pub.words is words and not self._fence:
            try:
                raw = self._impl.lookup_raw(pub.kern, key)
            except _READ_ERRORS:
                pass
            else:
                if words[_SEQ] == s1:
                    return raw
        return self._consistent(self._impl.lookup_raw, key)

    def _py_get_decoded(
        self, vdec: Callable[[bytes], Any], edec: Callable[[bytes], Any], fail: Callable, key: Key
    ) -> Optional[Entry]:
        """The Entry of ``key`` decoded by ``edec(entry bytes)`` (a 6-item tuple), or
        None; a ValueError of the decoder goes to ``fail(key, exc)``, which raises.
        ``_speedups.ReaderBase._get_decoded`` does this in C, with ``vdec`` decoding
        only the value (faster)."""
        raw = self._get_raw(key)
        if raw is None:
            return None
        try:
            return _new(Entry, edec(raw))
        except ValueError as exc:
            fail(key, exc)
            raise  # fail() raises; not reached

    if _speedups is None:
        _get_decoded = _py_get_decoded

    def typed(self, type_: Any) -> "TypedView":
        """A view of this Reader whose entries' ``decoded`` is a ``type_`` (a msgspec
        Struct, or any type msgspec decodes into): see :class:`TypedView`.

        Needs msgspec (the ``typed`` extra; ExtraMissingError otherwise). One view
        per type is kept, so ``r.typed(Service).get(key)`` costs no decoder set-up.
        """
        views = self.__dict__.setdefault("_typed_views", {})
        view = views.get(type_)
        if view is None:
            view = views[type_] = TypedView(
                self,
                type_,
                get_decoded=self._get_decoded,
                consistent=self._consistent,
                range_raw=self._impl.range_raw,
            )
        return view

    def __getitem__(self, key: Key) -> Entry:
        e = self.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def __contains__(self, key: Key) -> bool:
        return self.get(key) is not None

    def range(self, from_key: Key, to_key: Optional[Key]) -> List[Entry]:
        """Entries with ``from_key <= key < to_key`` in key order (``to_key=None``: to the end).

        O(log n + k) for k entries: a binary search, then one unpack per entry.
        """
        lo = query_key(from_key)[0]
        hi = None if to_key is None else query_key(to_key)[0]
        return self._consistent(self._impl.range, lo, hi)

    def prefixed(self, prefix: Key) -> List[Entry]:
        """Entries whose key starts with ``prefix``, in key order. O(log n + k)."""
        p = query_key(prefix)[0]
        return self._consistent(self._impl.range, p, prefix_end(p))

    def __len__(self) -> int:
        return self._current()[1].view.count

    @property
    def revision(self) -> int:
        """Revision of the snapshot currently published (see KeySpace.header)."""
        return self._current()[1].revision

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
                    return fn(self._impl.kernel(ImageView(memoryview(img), 0, len(img))), *args)
                except _READ_ERRORS as exc:
                    raise CorruptSegmentError(f"snapshot {self.name!r}: {exc}") from None
            words = pub.ctrl.words
            try:
                out = fn(pub.kern, *args)
            except _READ_ERRORS as exc:
                if self._moved(s1, words):
                    self.retries += 1
                    continue
                raise CorruptSegmentError(f"snapshot {self.name!r}: {exc}") from None
            if not self._moved(s1, words):
                return out
            self.retries += 1
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable read after {_MAX_RETRIES} tries")

    def snapshot(self, copy: bool = False) -> "SnapshotView":
        """A view of one publication for several queries (a context manager).

        Queries on the view raise SnapshotExpiredError once the writer has recycled
        its buffer (two publications later; three with a view grace, a Writer's
        default: the data segment then has three buffers), which it never does sooner than
        its ``view_grace`` (default 0.1 s) after the view was opened: a view is
        guaranteed that long, however busy the host. ``copy=True`` takes a private
        copy of the image instead, which never expires. Both raise ReaderClosedError once
        the Reader is closed.
        """
        for _ in range(_MAX_RETRIES):
            s1, pub = self._current()
            if not copy:
                return SnapshotView(
                    self,
                    s1,
                    pub.ctrl.words,
                    pub.data.buffers,
                    pub.view,
                    pub.kern,
                    None,
                    impl=self._impl,
                    moved=self._moved,
                )
            img = self._copy_image(s1, pub)
            if img is None:
                continue
            view = ImageView(memoryview(img), 0, len(img))
            return SnapshotView(
                self,
                s1,
                pub.ctrl.words,
                2,
                view,
                self._impl.kernel(view),
                img,
                impl=self._impl,
                moved=self._moved,
            )
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable read after {_MAX_RETRIES} tries")

    def _copy_image(self, s1: int, pub: _Pub) -> Optional[bytes]:
        """A private copy of ``pub``'s image (one memcpy); None if the writer moved meanwhile."""
        img = bytes(pub.view.buf)
        if self._moved(s1, pub.ctrl.words):
            self.retries += 1
            return None
        return img

    # -- waiting and health ----------------------------------------------------------
    def sync(self, timeout: float = 5.0) -> int:
        """Make this reader's next query see every change etcd committed under the prefix
        before this call: read-your-writes across processes, without a watch here.

        The writer makes a linearizable read of etcd's revision R after the request
        arrives, asks its watch for progress, and answers once its published
        snapshot is current through R (consistent.py); returns R. Costs a round
        trip to the writer plus one to etcd's leader, a progress notification and
        the writer's apply delay (``./run bench --only sync``). Raises
        :class:`SyncTimeoutError` after ``timeout`` seconds and :class:`SyncError`
        when no writer answers, etcd does not answer the writer, or its
        publications fail. Thread-safe; calls from many processes share rounds.
        """
        from . import consistent

        return consistent.request(self.name, self.owner_uid, timeout)

    def wait_for_revision(self, revision: int, timeout: Optional[float] = None) -> bool:
        """Sleep until the published revision is >= ``revision``; False on timeout.

        Sleeps in the kernel on the shared seq word (futex.py), which the writer
        wakes after each publication: the waiter runs ~0.1 ms after a publication
        and costs no CPU while idle (bench/scenarios/feed.py). Each sleep lasts at most
        1 s, so a dead writer never holds a waiter past ``timeout`` and a restarted
        one is followed. Where futexes are unavailable it polls the seq word (one
        8-byte load), backing off from 0.5 to 4 ms. Reads the publication record,
        not the image: cheap enough to call in a loop.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = -1
        delay = 0.0005
        while True:
            # ``words`` pins the mapping while this thread sleeps on it: a close()
            # from another thread only drops references, so the address stays valid.
            words = self._words
            addr = self._seq_addr
            s = words[_SEQ]  # ReaderClosedError once closed
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
            # A retired block never moves again: look for the name's new one often.
            nap = _FOLLOW_EVERY if self._control().retired else 1.0
            if addr and futex.wait(addr, s, nap if left is None else min(left, nap)):
                continue
            if self._follow():  # slept through: the name may have a new block (issue 25)
                seen = -1
                continue
            time.sleep(delay if left is None else min(delay, left))
            delay = min(0.004, delay * 2)

    def _seq_word(self) -> int:
        return self._words[_SEQ]

    def _record_revision(self) -> int:
        """The published revision, from the publication record (no image mapping)."""
        for _ in range(_MAX_RETRIES):
            ctrl = self._control()
            s1 = ctrl.words[_SEQ]
            if self._fence:
                segment.fence()
            rev = ctrl.active_record(s1)[4]
            if not self._moved(s1, ctrl.words):
                return rev
        raise CorruptSegmentError(f"snapshot {self.name!r}: no stable record after {_MAX_RETRIES} tries")

    # -- change feed, watch, derived state ------------------------------------------------
    def changes(self, since_revision: int) -> feed.Changes:
        """Keys changed in ``(since_revision, revision]``: a key-ordered list (feed.Changes).

        Deleted keys are included; keys come in :attr:`Entry.key`'s form. The result's
        ``revision`` attribute is the published revision it is complete up to (pass it
        as the next ``since_revision``). Raises ChangesTooOldError when the writer's
        bounded log no longer reaches back to ``since_revision`` or a load/reload lies
        in between. Cost: ~20 us for 100 keys (bench/scenarios/feed.py), independent of
        the snapshot's size.
        """
        since = int(since_revision)
        for _ in range(_MAX_RETRIES):
            s1, pub = self._current()
            rec = pub.ctrl.active_record(s1)
            words = pub.ctrl.words
            try:
                out = feed.read_changes(
                    pub.data.buf, rec[2] + segment.feed_offset(rec[3]), rec[7], since, pub.revision
                )
            except _READ_ERRORS as exc:
                if self._moved(s1, words):
                    self.retries += 1
                    continue
                raise CorruptSegmentError(f"snapshot {self.name!r}: {exc}") from None
            except ChangesTooOldError:
                if self._moved(s1, words):
                    self.retries += 1
                    continue
                raise
            if not self._moved(s1, words):
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
        """Writer liveness and publication facts (a stat and a lock probe: not for hot paths).

        ``stale_after``: heartbeat age, in seconds, past which a writer counts as
        dead even if its lock is held (default: 5 heartbeat intervals, at least 2 s).
        It is not the writer's ``--stale-after``: ``stale`` compares the writer's
        contact age with that one, which the writer publishes.

        First follows the name if it now opens another control block (a writer
        re-created the segments: :meth:`_follow`). ``writer_alive`` is never true
        for a writer this reader does not follow: the block read must still be
        the name's, and not retired.
        """
        self._follow()
        s1, pub = self._current()
        ctrl = pub.ctrl
        w = ctrl.words
        pid = w[segment.OFF_PID // 8]
        hb = w[segment.OFF_HEARTBEAT // 8]
        interval = w[segment.OFF_HB_INTERVAL // 8] / 1e9 or 0.5
        age = (time.monotonic_ns() - hb) / 1e9 if hb else None
        limit = stale_after if stale_after is not None else max(2.0, 5 * interval)
        alive = (
            pid != 0
            and age is not None
            and age < limit
            and not ctrl.retired
            and not ctrl.moved()
            and writerlock.writer_is_running(self.name)
        )
        rec = ctrl.active_record(s1)
        # Never below the published revision: the writer has heard of at least that.
        etcd_rev = max(w[segment.OFF_ETCD_REV // 8], pub.revision)
        contact = w[segment.OFF_CONTACT // 8]
        contact_limit = w[segment.OFF_STALE_AFTER // 8]  # ns; the writer's --stale-after
        contact_age = max(0.0, (time.monotonic_ns() - contact) / 1e9) if contact else None
        if not alive:
            stale = True
        elif not contact_limit:
            stale = False  # a writer that does not track contact: liveness is all we know
        else:
            stale = contact_age is None or contact_age * 1e9 > contact_limit
        ok_ns, fail_ns = w[segment.OFF_PERSIST_NS // 8], w[segment.OFF_PERSIST_FAIL_NS // 8]
        return Health(
            self.name,
            alive,
            pid,
            age,
            pub.revision,
            etcd_rev,
            etcd_rev - pub.revision,
            pub.view.count,
            rec[3],
            pub.gen,
            rec[6] / 1e9,
            s1,
            segment.SOURCE_NAMES.get(w[segment.OFF_SOURCE // 8], "unknown"),
            contact_age,
            stale,
            w[segment.OFF_PIDNS // 8],
            pub.ext[2] + self._epoch_offset,
            pub.ext[0],
            w[segment.OFF_PERSISTS // 8],
            w[segment.OFF_PERSIST_FAILURES // 8],
            max(0.0, time.time() - ok_ns / 1e9) if ok_ns else None,
            max(0.0, time.time() - fail_ns / 1e9) if fail_ns else None,
            ctrl.retired,
            *load_words(w),
        )


def load_words(w: Any) -> Tuple[str, int, int, int]:
    """The control block's full-load words: (state, keys, page retries, restarts). O(1)."""
    return (
        segment.LOAD_STATE_NAMES.get(w[segment.OFF_LOAD_STATE // 8], "idle"),
        w[segment.OFF_LOAD_KEYS // 8],
        w[segment.OFF_LOAD_RETRIES // 8],
        w[segment.OFF_LOAD_RESTARTS // 8],
    )
