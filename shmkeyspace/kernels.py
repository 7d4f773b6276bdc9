"""The query kernels: which implementations this installation offers, and loading them.

Owns the choice between the compiled extension (``_speedups``, set up here once
with the Entry type, CorruptSegmentError, the unpacker and xxh3) and the Python
kernels of ``snapshot.ImageView``: :data:`IMPLEMENTATIONS`, :data:`compiled` and
the per-implementation kernel table :data:`IMPLS`. A kernel answers from one
image and knows nothing of the seqlock (reader.py retries around it). The
writer side (builder.py) runs its O(n) kernels from :data:`compiled` too, or the
Python ones below, so neither side imports the other.

Promises: both implementations give the same answers (the property, torture and
fuzz tests run on each); ``SHMKEYSPACE_PURE_PYTHON=1`` switches the compiled one off.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from array import array
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from xxhash import xxh3_64_intdigest

from .errors import CorruptSegmentError
from .snapshot import ImageView, key_hash, raw_key, unpackb
from .views import Entry, Key, make_entry

try:
    if os.environ.get("SHMKEYSPACE_PURE_PYTHON", "") not in ("", "0"):
        raise ImportError("SHMKEYSPACE_PURE_PYTHON is set")
    from . import _speedups
except ImportError:  # not built (no compiler at install time) or switched off
    _speedups = None

_new = tuple.__new__
#: One hash-table slot: (xxh3 of the key or 1, offset | length << 32); the low word's mask.
SLOT = struct.Struct("<QQ")
M32 = 0xFFFFFFFF
#: (key, create_revision, mod_revision, version) of an image's most recently modified key.
Top = Optional[Tuple[bytes, int, int, int]]

# -- the two implementations of the query kernels --------------------------------------
# A kernel answers from one image (snapshot.ImageView, or its compiled twin
# _speedups.Image) and knows nothing of the seqlock.


def _py_lookup(kern: ImageView, key: Key) -> Optional[Entry]:
    lst = kern.lookup(key)
    return None if lst is None else _new(Entry, lst)


def _py_range(kern: ImageView, lo: bytes, hi: Optional[bytes]) -> List[Entry]:
    return list(map(make_entry, kern.range(lo, hi)))


def _py_kernel(view: ImageView) -> Any:
    return view


class Impl(NamedTuple):
    """The kernels of one implementation."""

    lookup: Callable[..., Optional[Entry]]
    range: Callable[..., List[Entry]]
    kernel: Callable[[ImageView], Any]
    # The same entries as msgpack bytes (TypedView decodes them itself).
    lookup_raw: Callable[..., Optional[bytes]]
    range_raw: Callable[..., bytes]


#: Per implementation name, its kernels.
IMPLS = {"python": Impl(_py_lookup, _py_range, _py_kernel, ImageView.lookup_raw, ImageView.range_raw)}
if _speedups is not None:
    _speedups.setup(Entry, CorruptSegmentError, unpackb, xxh3_64_intdigest)
    IMPLS["c"] = Impl(
        _speedups.Image.lookup,
        _speedups.Image.range,
        _speedups.Image.of,
        _speedups.Image.lookup_raw,
        _speedups.Image.range_raw,
    )

#: The implementations this installation offers: "c" (the compiled extension) if it
#: is built and SHMKEYSPACE_PURE_PYTHON is not set, and always "python".
IMPLEMENTATIONS = tuple(sorted(IMPLS))
#: The compiled extension, set up (None: not built, or SHMKEYSPACE_PURE_PYTHON=1).
#: builder.py runs its O(n) kernels from it too.
compiled = _speedups


# -- the builder's kernels (C twins in _speedups.c) -------------------------------------


class KeySeq:
    """The keys of an order array, as a sequence bisect can search (reads each from the arena)."""

    __slots__ = ("order", "arena")

    def __init__(self, order: array, arena: Any) -> None:
        self.order, self.arena = order, arena

    def __len__(self) -> int:
        return len(self.order) >> 1

    def __getitem__(self, i: int) -> bytes:
        o = self.order[2 * i]
        return raw_key(self.arena, o, o + self.order[2 * i + 1])


def py_keys_at(order: array, arena: Any, step: int) -> List[bytes]:
    """The keys of entries 0, step, 2*step, ... of ``order``. O(n / step)."""
    return [raw_key(arena, order[i], order[i] + order[i + 1]) for i in range(0, len(order), 2 * step)]


def py_lower_bound(order: array, arena: Any, key: bytes) -> int:
    """Position of the first entry with key >= ``key``. O(log n) entry reads."""
    return bisect.bisect_left(KeySeq(order, arena), key)


def py_find(table: Any, arena: Any, key: bytes) -> Tuple[int, int]:
    """``(slot, offset | length << 32)`` of ``key`` in the hash table, or ``(-1, 0)``. O(1) expected."""
    slots = len(table) >> 4
    mask = slots - 1
    h = key_hash(key)
    i = h & mask
    for _ in range(slots):
        sh, ol = SLOT.unpack_from(table, 16 * i)
        if sh == 0:
            break
        if sh == h:
            o = ol & M32
            if raw_key(arena, o, o + (ol >> 32)) == key:
                return i, ol
        i = (i + 1) & mask
    return -1, 0


def py_entry_mod(arena: Any, off: int, n: int) -> int:
    """The mod_revision field of the entry at ``arena[off:off+n]``."""
    return unpackb(arena[off : off + n])[3]


def py_table(order: array, arena: Any, slots: int) -> bytearray:
    """The hash table of the entries ``order`` lists (``slots``: a power of two > 2n).

    Keys are unique, so a rebuild needs no key compares. Sorting the keys by
    home slot makes linear probing a running max: pos_i = max(home_i,
    pos_{i-1} + 1); any layout where every slot between a key's home and its
    position is taken answers lookups and backward-shift deletes correctly.
    The sort runs in C on one int per key (home << 32 | index). 1M keys:
    0.9 s of slot-by-slot probing -> ~0.4 s; the C twin probes (~0.1 s).
    """
    keys = py_keys_at(order, arena, 1)
    mask = slots - 1
    h64 = xxh3_64_intdigest
    by_home = sorted([(h64(k) & mask) << 32 | i for i, k in enumerate(keys)])
    flat = array("Q", bytes(16 * slots))
    wrapped = []
    p = -1
    for v in by_home:
        home = v >> 32
        p = home if home > p else p + 1
        i = v & M32
        if p >= slots:
            wrapped.append(i)
            continue
        flat[2 * p] = h64(keys[i]) or 1  # 0 marks an empty slot (as key_hash)
        flat[2 * p + 1] = order[2 * i] | order[2 * i + 1] << 32
    del by_home
    q = 0
    for i in wrapped:  # runs past the last slot continue at slot 0
        while flat[2 * q]:
            q += 1
        flat[2 * q] = h64(keys[i]) or 1
        flat[2 * q + 1] = order[2 * i] | order[2 * i + 1] << 32
    return bytearray(memoryview(flat).cast("B"))  # one copy, not two


def py_scan(arena: Any, order: Any, root: bytes, revision: int, base: int = 0) -> Top:
    """Check every entry ``order`` lists in ``arena``; return the :data:`Top` (None if empty).

    Checks, first failure a ValueError naming the entry: it lies inside the
    arena and unpacks (with the readers' unpacker) to a 6-element array with a
    str/bin key and int revisions; keys strictly increasing and under
    ``root``; 0 < create_revision <= mod_revision <= ``revision``; version >=
    1; lease >= 0. ``base``: the index of ``order``'s first entry in the image
    (messages name entries by it). O(n): ~2 us a key.
    """
    n = len(arena)
    offs = order.tolist()
    top: Top = None
    last: Optional[bytes] = None
    for i in range(0, len(offs), 2):
        off, ln = offs[i], offs[i + 1]
        if off + ln > n:
            raise ValueError(f"entry {base + i // 2} lies outside the arena")
        try:
            e = unpackb(arena[off : off + ln])
        except Exception as exc:
            raise ValueError(f"entry {base + i // 2} does not unpack: {exc}") from None
        if type(e) is not list or len(e) != 6:
            raise ValueError(f"entry {base + i // 2} is not a 6-element array")
        k, _decoded, c, m, v, lease = e
        if type(k) is str:
            kb = k.encode("utf-8")
        elif type(k) is bytes:
            kb = k
        else:
            raise ValueError(f"entry {base + i // 2} is not a 6-element array with a str/bin key")
        # Exact type tests, no generator: this loop is the O(n) part of a resume.
        if type(c) is not int or type(m) is not int or type(v) is not int or type(lease) is not int:
            raise ValueError(f"entry {base + i // 2} has non-integer revisions")
        if not (0 < c <= m <= revision and v >= 1 and lease >= 0):
            raise ValueError(f"entry {base + i // 2} has impossible revisions for revision {revision}")
        if not kb.startswith(root):
            raise ValueError(f"entry {base + i // 2}: its key is outside the prefix")
        if last is not None and kb <= last:
            raise ValueError(f"entry {base + i // 2}: keys are not sorted and unique")
        last = kb
        if top is None or m > top[2]:
            top = (kb, c, m, v)
    return top


class BuilderKernels(NamedTuple):
    """One implementation of the builder's kernels (the py_ functions or their C twins)."""

    scan: Callable[..., Top]
    table: Callable[[array, Any, int], bytearray]
    find: Callable[[Any, Any, bytes], Tuple[int, int]]
    entry_mod: Callable[[Any, int, int], int]
    lower_bound: Callable[[array, Any, bytes], int]
    keys_at: Callable[[array, Any, int], List[bytes]]


BUILDER_KERNELS = {
    "python": BuilderKernels(py_scan, py_table, py_find, py_entry_mod, py_lower_bound, py_keys_at)
}
if _speedups is not None:
    BUILDER_KERNELS["c"] = BuilderKernels(
        _speedups.scan_entries,
        _speedups.build_table,
        _speedups.find_slot,
        _speedups.entry_mod,
        _speedups.lower_bound,
        _speedups.keys_at,
    )
#: Images of at least this many entries are scanned in two halves at once (scan_image).
SPLIT_SCAN = 100_000
#: The builder kernel implementations this installation offers ("c" needs the extension):
#: builder.IMPLEMENTATIONS.
BUILDER_IMPLEMENTATIONS = tuple(sorted(BUILDER_KERNELS))
DEFAULT_BUILDER_IMPL = BUILDER_IMPLEMENTATIONS[0]


def scan_entries(k: BuilderKernels, arena: Any, order: Any, root: bytes, revision: int) -> Top:
    """``k.scan`` of every entry ``order`` lists, errors as CorruptSegmentError.

    With the C kernels, 100k+ entries are checked in two halves at once on two
    threads (the C scan runs without the GIL; 1M keys: 0.12 s -> 0.10 s,
    measured); the halves meet at ``mid``, whose key must follow the first
    half's last one.
    """
    n = len(order) >> 1
    try:
        if k is BUILDER_KERNELS["python"] or n < SPLIT_SCAN:
            return k.scan(arena, order, root, revision)
        mid = n // 2
        first: List[Any] = []

        def scan_first() -> None:
            try:
                first.append(k.scan(arena, order[: 2 * mid], root, revision))
            except BaseException as exc:  # re-raised below, on the caller's thread
                first.append(exc)

        t = threading.Thread(target=scan_first, name="shmkeyspace-scan")
        t.start()
        try:
            second = k.scan(arena, order[2 * mid :], root, revision, mid)
        finally:
            t.join()
        if isinstance(first[0], BaseException):
            raise first[0]
        before, at = (order[2 * i] for i in (mid - 1, mid))
        if not raw_key(arena, before, before + order[2 * mid - 1]) < raw_key(
            arena, at, at + order[2 * mid + 1]
        ):
            raise ValueError(f"entry {mid}: keys are not sorted and unique")
        top1, top2 = first[0], second
        return top2 if top1 is None or (top2 is not None and top2[2] > top1[2]) else top1
    except (ValueError, CorruptSegmentError) as exc:
        raise CorruptSegmentError(str(exc)) from None
