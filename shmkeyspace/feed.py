"""The change feed: which keys each recent publication changed, and a watch over it.

Owns both halves of the feed region (one protocol, one module): the writer's
:class:`ChangeLog` and the readers' :func:`read_changes` / :func:`watch`.

Each publication writes, right after its snapshot image in the same buffer (at
the image start + the image length rounded up to 8), a feed region whose length
is the publication record's last word (``segment.py``; 0 = no feed). The image
format (``snapshot.py``) is untouched: the feed rides in the same seqlock-protected
buffer, so a reader sees the feed and the snapshot of one publication together.

Feed region::

    head   FEED_HEAD (48 B): magic, version, entry count n, floor, revision,
           xxh3-64 checksum of the head (up to itself) and the table
    table  n x (revision i64, offset u32, length u32), oldest first; offsets
           relative to the region start
    bodies one msgpack array per entry: the keys that publication changed, in
           key order, in Entry.key's form (str if UTF-8, else bytes)

Promises: ``changes(since)`` for ``floor <= since`` is exactly the union of the
entries with ``revision > since``; ``floor`` is the revision before the oldest
entry kept — or the revision of the last load/reload, whose change set is
"everything" and therefore is never logged. Sizing: at most ``keep`` entries and
``max_bytes`` of bodies (writer options ``--changes-keep``/``--changes-bytes``);
the oldest entries go first, and a single publication larger than ``max_bytes``
empties the log (floor = its revision).

Costs: the writer packs each publication's keys once (O(changed keys)) and
re-joins the region per publication (one copy of at most ``max_bytes``); a reader's
``changes()`` checksums the head+table (16 B per entry kept), copies and unpacks
only the entries newer than ``since`` and sorts their union: ~20 us for 100 keys
(bench/scenarios/feed.py).
"""

from __future__ import annotations

import bisect
import struct
import time
from collections import deque
from functools import partial
from typing import Any, Deque, Iterable, Iterator, Optional, Protocol, Tuple

import msgpack
from xxhash import xxh3_64_intdigest

from .errors import ChangesTooOldError, CorruptSegmentError, InvalidKeyError, InvalidSettingError
from .snapshot import entry_key


class ChangesSource(Protocol):
    """What :func:`advance` needs of a Reader (reader.py imports this module, never
    the other way round)."""

    def changes(self, since_revision: int) -> "Changes": ...


class FeedSource(ChangesSource, Protocol):
    """What :func:`watch` needs of a Reader."""

    @property
    def revision(self) -> int: ...

    def wait_for_revision(self, revision: int, timeout: Optional[float] = None) -> bool: ...


FEED_MAGIC = b"SHMKFEED"
FEED_VERSION = 1
# magic, version, n, floor, revision, checksum
FEED_HEAD = struct.Struct("<8sIIqqQ")
_HASHED = FEED_HEAD.size - 8
FEED_ENTRY = struct.Struct("<qII")
# msgpack's C unpacker, not ormsgpack: for lists of short str keys it was ~1.4x
# faster here (11.8 vs 16.8 us for 100 keys, same run, bench machine loaded).
_unpack_keys = partial(msgpack.unpackb, raw=False, use_list=True)
#: Default number of publications the feed keeps (writer --changes-keep).
DEFAULT_KEEP = 1024
#: Default bytes of packed keys the feed keeps (writer --changes-bytes): the
#: region is copied into every publication, ~25 us per 256 KiB here.
DEFAULT_BYTES = 256 << 10


class Changes(list):
    """Keys changed in ``(since, revision]``, in key order (a list).

    ``revision`` is the published revision the answer is complete up to: pass it
    as ``since`` next time to continue without gaps or repeats.
    """

    __slots__ = ("since", "revision")

    def __init__(self, keys: Iterable[Any], since: int, revision: int) -> None:
        super().__init__(keys)
        self.since = since
        self.revision = revision

    def __repr__(self) -> str:
        return f"Changes(since={self.since}, revision={self.revision}, keys={list.__repr__(self)})"


# -- writer half -----------------------------------------------------------------------------


class ChangeLog:
    """The writer's bounded log of (revision, changed keys). Not thread-safe.

    ``record`` is called once per KeySpace update (published or not: a failed
    publication's changes ride in the next one), ``region`` gives the bytes to
    publish. ``keep`` 0 disables the feed (readers' ``changes`` then always
    raises ChangesTooOldError, except for ``since == revision``).
    """

    def __init__(self, keep: int = DEFAULT_KEEP, max_bytes: int = DEFAULT_BYTES) -> None:
        if keep < 0 or max_bytes < 0:
            raise InvalidSettingError("changes keep and bytes must be >= 0")
        self.keep = keep
        self.max_bytes = max_bytes
        self.floor = 0
        self.revision = 0
        self._entries: Deque[Tuple[int, bytes]] = deque()
        self._bytes = 0
        self._region: Optional[bytes] = None

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, revision: int, changed: Optional[Iterable[bytes]]) -> None:
        """Log one update at ``revision``; ``changed`` None means a load/reload. O(k log k)."""
        self._region = None
        if changed is None or self.keep == 0:
            self._entries.clear()
            self._bytes = 0
            self.floor = self.revision = revision
            return
        body = msgpack.packb([entry_key(k) for k in sorted(changed)], use_bin_type=True)
        self._entries.append((revision, body))
        self._bytes += len(body)
        self.revision = revision
        while self._entries and (len(self._entries) > self.keep or self._bytes > self.max_bytes):
            rev, old = self._entries.popleft()
            self._bytes -= len(old)
            self.floor = rev

    def region(self) -> bytes:
        """The feed region for the current state (cached until the next record)."""
        if self._region is None:
            n = len(self._entries)
            table = bytearray(FEED_ENTRY.size * n)
            off = FEED_HEAD.size + len(table)
            for i, (rev, body) in enumerate(self._entries):
                FEED_ENTRY.pack_into(table, i * FEED_ENTRY.size, rev, off, len(body))
                off += len(body)
            head = bytearray(FEED_HEAD.size)
            FEED_HEAD.pack_into(head, 0, FEED_MAGIC, FEED_VERSION, n, self.floor, self.revision, 0)
            checksum = xxh3_64_intdigest(bytes(head[:_HASHED]) + bytes(table))
            struct.pack_into("<Q", head, _HASHED, checksum)
            self._region = b"".join([head, table, *(b for _, b in self._entries)])
        return self._region

    def _check(self) -> None:
        """Invariants (tests call this). O(entries)."""
        revs = [r for r, _ in self._entries]
        assert revs == sorted(revs) and len(set(revs)) == len(revs), "revisions not increasing"
        assert all(r > self.floor for r in revs), "an entry at or below the floor"
        assert self._bytes == sum(len(b) for _, b in self._entries)
        assert len(self._entries) <= self.keep and self._bytes <= self.max_bytes
        if revs:
            assert self.revision == revs[-1]


# -- reader half -----------------------------------------------------------------------------


def parse_head(buf: Any, off: int, length: int) -> Tuple[int, int, int]:
    """Validate the region at ``buf[off:off+length]``; (n, floor, revision)."""
    if length < FEED_HEAD.size or off + length > len(buf):
        raise CorruptSegmentError(f"feed region {off}+{length} outside its {len(buf)}-byte buffer")
    magic, version, n, floor, revision, checksum = FEED_HEAD.unpack_from(buf, off)
    if magic != FEED_MAGIC or version != FEED_VERSION:
        raise CorruptSegmentError(f"bad change feed magic/version {magic!r}/{version}")
    tend = FEED_HEAD.size + n * FEED_ENTRY.size
    if tend > length:
        raise CorruptSegmentError("change feed table runs past its region")
    # One private copy of head + table: the checksum and the parse see the same bytes.
    raw = bytes(buf[off : off + tend])
    if xxh3_64_intdigest(raw[:_HASHED] + raw[FEED_HEAD.size :]) != checksum:
        raise CorruptSegmentError("change feed checksum mismatch")
    return n, floor, revision


def read_changes(buf: Any, off: int, length: int, since: int, image_revision: int) -> Changes:
    """Keys changed in ``(since, revision]`` from the feed at ``buf[off:off+length]``.

    Raises ChangesTooOldError when the region does not reach back to ``since``;
    CorruptSegmentError on anything malformed. Cost: O(n) checksum of the table plus
    O(k log k) for the k keys returned. The caller validates the seqlock afterwards.
    """
    if length == 0:
        if since >= image_revision:
            return Changes((), since, image_revision)
        raise ChangesTooOldError(
            f"no change feed in this publication (writer without a feed, or an old one); "
            f"cannot answer changes since {since}",
            since=since,
            floor=image_revision,
            revision=image_revision,
        )
    n, floor, revision = parse_head(buf, off, length)
    if revision != image_revision:
        raise CorruptSegmentError(f"change feed revision {revision} != snapshot revision {image_revision}")
    if since >= revision:
        return Changes((), since, revision)
    if since < floor:
        raise ChangesTooOldError(
            f"changes since {since} are no longer in the feed (it starts after revision {floor}, "
            f"published {revision}): resume from the current snapshot",
            since=since,
            floor=floor,
            revision=revision,
        )
    tstart = off + FEED_HEAD.size
    # (revision, offset | length << 32) pairs: one cast, no per-entry struct calls.
    table = memoryview(bytes(buf[tstart : tstart + n * FEED_ENTRY.size])).cast("q")
    revs = table[0::2].tolist()
    first = bisect.bisect_right(revs, since)
    if first == n:
        return Changes((), since, revision)
    locs = table[1::2].tolist()[first:]
    start = locs[0] & 0xFFFFFFFF
    end = start
    for loc in locs:
        o, m = loc & 0xFFFFFFFF, (loc >> 32) & 0xFFFFFFFF
        if o != end:
            raise CorruptSegmentError("change feed bodies are not contiguous")
        end = o + m
    if start < FEED_HEAD.size + n * FEED_ENTRY.size or end > length:
        raise CorruptSegmentError("change feed entry lies outside its region")
    k = n - first
    # The bodies are back to back: one copy, then one unpack of them as a single
    # msgpack array (never a parse of shared memory in place).
    try:
        parts = _unpack_keys(b"\xdd" + k.to_bytes(4, "big") + bytes(buf[off + start : off + end]))
    except (ValueError, msgpack.UnpackException) as exc:
        raise CorruptSegmentError(f"undecodable change feed entry: {exc}") from None
    if len(parts) != k or set(map(type, parts)) - {list}:
        raise CorruptSegmentError("change feed entries are not lists of keys")
    if k == 1:
        return Changes(parts[0], since, revision)
    merged = set().union(*parts)
    try:
        out = sorted(merged)
    except TypeError:  # str and bytes keys together: order by the raw bytes
        out = sorted(merged, key=_raw)
    return Changes(out, since, revision)


def _raw(key: Any) -> bytes:
    return key.encode("utf-8") if type(key) is str else key


def prefix_bytes(prefix: Any) -> Optional[bytes]:
    """A watch prefix as raw bytes (None: everything)."""
    if prefix is None:
        return None
    if isinstance(prefix, str):
        return prefix.encode("utf-8")
    if isinstance(prefix, (bytes, bytearray, memoryview)):
        return bytes(prefix)
    raise InvalidKeyError(f"prefix must be str or bytes, not {type(prefix).__name__}")


def advance(reader: ChangesSource, since: int, pb: Optional[bytes]) -> Tuple[int, Optional[Changes]]:
    """One watch step once a publication after ``since`` exists: (new since, keys or None).

    Shared by :func:`watch` and ``aio.watch``. Raises ChangesTooOldError when the
    feed does not reach back, or the published revision went backwards.
    """
    ch = reader.changes(since)
    if ch.revision < since:
        raise backwards_error(since, ch.revision)
    keys = ch if pb is None else Changes([k for k in ch if _raw(k).startswith(pb)], ch.since, ch.revision)
    return ch.revision, (keys if keys else None)


def watch(
    reader: FeedSource, prefix: Any = None, since: Optional[int] = None, timeout: Optional[float] = None
) -> Iterator[Tuple[int, Changes]]:
    """Generator behind :meth:`Reader.watch` (see there)."""
    pb = prefix_bytes(prefix)
    if since is None:
        since = reader.revision
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        # Waits of at most 1 s: a writer restarted against an older revision never
        # reaches since + 1, and is noticed here within that second.
        if not reader.wait_for_revision(since + 1, WATCH_SLICE if left is None else min(left, WATCH_SLICE)):
            if reader.revision < since:
                raise backwards_error(since, reader.revision)
            continue
        since, keys = advance(reader, since, pb)
        if keys is not None:
            yield since, keys
            if timeout is not None:
                deadline = time.monotonic() + timeout


WATCH_SLICE = 1.0


def backwards_error(since: int, revision: int) -> ChangesTooOldError:
    return ChangesTooOldError(
        f"published revision went back from {since} to {revision} (a writer restarted against "
        "another cluster or an older state): resume from the current snapshot",
        since=since,
        floor=revision,
        revision=revision,
    )
