"""The snapshot format: one immutable, self-describing image of a KeySpace.

An image is what one publication writes into a buffer (see ``segment.py``)::

    header   HEADER (128 B): magic, format version, revision, count and the
             offset/size of every region below, all relative to the image start
    arena    entries, each a msgpack array [key, decoded, create_revision,
             mod_revision, version, lease]; key is str when valid UTF-8, else bin
    table    open-addressing hash table, 2**k slots of two u64:
             (xxh3_64(key) or 1, offset | length << 32); 0 marks an empty slot;
             linear probing, load factor <= 1/2
    order    (offset u32, length u32) per entry, in key order
    fences   msgpack array of every FENCE-th key (bytes), for range search

Promises: a point lookup touches one or two table slots and unpacks one entry,
O(1); a range search bisects the (reader-cached) fences then at most
log2(FENCE) entries, O(log n), then reads entries in key order. Every offset a
reader takes from an image is checked against the image's bounds first.

The writer builds images with :class:`shmkeyspace.builder.ImageBuilder`, in its
own memory, updated per changed key; publishing copies the image into shared
memory.

This module owns the reading side of the format: :class:`ImageView` with its
query kernels (``lookup``, ``range``, and ``lookup_raw``, ``range_raw``: the same
entries as msgpack bytes, for decoders of their own such as ``Reader.typed``'s);
``shmkeyspace/_speedups.c`` is a compiled
copy of those kernels and must change together with them. The kernels answer
from one image and know nothing of the seqlock: ``reader.py`` runs them between
its seq checks and retries when the writer moved. Anything they raise because of
what the bytes hold is a CorruptSegmentError or a ValueError (the unpacker's
errors); any other exception is a bug in this code and is not retried.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import sys
from operator import add
from typing import Any, List, Optional, Tuple

import msgpack
import ormsgpack
from xxhash import xxh3_64, xxh3_64_intdigest

from .errors import CorruptSegmentError, InvalidKeyError, NotSerializableError

# Readers cast the index regions to native arrays (no per-slot unpacking), so the
# format is little-endian by construction: x86-64 and aarch64 are.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("shmkeyspace's snapshot format needs a little-endian CPU")

MAGIC = b"SHMKSNAP"
FORMAT_VERSION = 1
# magic, version, fence_step, revision, count, then (offset, size) of arena,
# table (size = slots), order, fences; total length; index checksum.
HEADER = struct.Struct("<8sIIqQQQQQQQQQQQ")
#: The checksum covers the header up to itself.
HASHED_HEAD = HEADER.size - 8
HEADER_SIZE = 128
FENCE = 32
MAX_IMAGE = 1 << 32  # u32 offsets
ALIGN = 64


def entry_key(key: bytes) -> Any:
    """The key as stored in an entry: str if it is UTF-8, else bytes."""
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return key


_packer = msgpack.Packer(use_bin_type=True)

#: The readers' unpacker. ormsgpack (Rust) unpacks an entry in about half the
#: time msgpack's C extension takes (measured: bench/README.md); the format is
#: plain msgpack either way.
unpackb = ormsgpack.unpackb


def pack_entry(
    key: bytes,
    decoded: Any,
    create_revision: int,
    mod_revision: int,
    version: int,
    lease: int,
    verify: bool = True,
) -> bytes:
    """Pack one entry; raise NotSerializableError unless readers can unpack it.

    The packed bytes are round-tripped through the readers' unpacker, so a value
    that packs but cannot be read back (e.g. a dict with int keys) is refused here,
    in the writer, instead of failing in every reader. ``verify=False`` skips that
    round trip (~1 us of ~3 us an entry) for values known to be readable: what a
    decoder marked ``msgpack_safe`` returns (see :mod:`shmkeyspace.decoders`).
    """
    try:
        packed = _packer.pack([entry_key(key), decoded, create_revision, mod_revision, version, lease])
        if verify:
            unpackb(packed)
        return packed
    except (TypeError, ValueError, OverflowError, ormsgpack.MsgpackDecodeError) as exc:
        raise NotSerializableError(
            f"decoded value of key {key!r} cannot be stored in shared memory: {exc} "
            "(decoders must return msgpack-serializable values readers can unpack: None, bool, "
            "int, float, str, bytes, and lists/tuples/dicts of them, dict keys being str)"
        ) from None


def key_hash(key: bytes) -> int:
    """Stable 64-bit hash of a raw key; never 0 (0 marks an empty slot)."""
    return xxh3_64_intdigest(key) or 1


def index_checksum(head, table, order, fences) -> int:
    """xxh3-64 over the header (up to the checksum) and the three index regions.

    Readers verify it once per publication (~1 ms per 10 MB of index at
    ~10 GB/s): a damaged index is an error, not keys that silently vanish.
    Entry payloads are not covered (see README, Reliability).
    """
    h = xxh3_64()
    h.update(memoryview(head)[:HASHED_HEAD])
    h.update(table)
    h.update(order)
    h.update(fences)
    return h.intdigest()


def query_key(key: Any) -> Tuple[bytes, Any]:
    """(raw bytes, the form an entry stores the key in) of a query key.

    Raises TypeError for anything but str and bytes-like keys.
    """
    if type(key) is str:
        return key.encode("utf-8"), key
    if isinstance(key, (bytes, bytearray, memoryview)):
        kb = bytes(key)
        try:
            return kb, kb.decode("utf-8")
        except UnicodeDecodeError:
            return kb, kb
    raise InvalidKeyError(f"key must be str or bytes, not {type(key).__name__}")


def align(n: int) -> int:
    """``n`` rounded up to the alignment of the index regions."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def raw_key(buf: Any, off: int, end: int) -> bytes:
    """The raw key bytes of the entry at ``buf[off:]`` (which must end by ``end``).

    Parses the msgpack header of the entry's first element without unpacking
    the value. Raises CorruptSegmentError on anything unexpected.
    """
    if off + 2 > end or buf[off] != 0x96:
        raise CorruptSegmentError(f"entry at offset {off} is not a 6-element msgpack array")
    t = buf[off + 1]
    if 0xA0 <= t <= 0xBF:
        start, n = off + 2, t - 0xA0
    elif t in (0xD9, 0xC4):
        start, n = off + 3, buf[off + 2] if off + 3 <= end else -1
    elif t in (0xDA, 0xC5):
        start, n = off + 4, int.from_bytes(buf[off + 2 : off + 4], "big")
    elif t in (0xDB, 0xC6):
        start, n = off + 6, int.from_bytes(buf[off + 2 : off + 6], "big")
    else:
        raise CorruptSegmentError(f"entry at offset {off} has no str/bin key (type byte {t:#x})")
    if n < 0 or start + n > end:
        raise CorruptSegmentError(f"key of entry at offset {off} runs past its bounds")
    return bytes(buf[start : start + n])


class ImageView:
    """Reader-side, validated view of one image inside a read-only buffer.

    Construction checks every region against the image bounds; the methods check
    every entry offset they follow. Holds memoryviews into the mapping: call
    :meth:`release` before the mapping is closed.

    Never parse shared memory in place: the writer may rewrite it mid-parse, and
    C/Rust parsers assume their input holds still (a torn string length between
    two passes is a heap overflow, not an exception; the fenced-path soak
    segfaulted that way). Entries are copied out first by slicing ``src`` (the
    mmap itself: one memcpy into a new bytes, cheaper than a memoryview slice)
    at ``arena_base + offset``, then parsed; the seqlock check decides whether
    the copy is usable. Integers read through the ``table``/``order`` casts are
    plain loads and safe to read torn.
    """

    __slots__ = (
        "buf",
        "revision",
        "count",
        "arena",
        "arena_len",
        "table",
        "mask",
        "slots",
        "order",
        "fence_step",
        "_fences",
        "_fence_region",
        "src",
        "arena_base",
        "offset",
        "table_off",
        "order_off",
    )

    def __init__(self, buf: memoryview, offset: int, length: int) -> None:
        if offset < 0 or length < HEADER_SIZE or offset + length > len(buf):
            raise CorruptSegmentError(f"image at {offset}+{length} lies outside its {len(buf)}-byte buffer")
        img = buf[offset : offset + length]
        try:
            (
                magic,
                version,
                fence_step,
                revision,
                count,
                arena_off,
                arena_len,
                table_off,
                slots,
                order_off,
                order_len,
                fence_off,
                fence_len,
                total,
                checksum,
            ) = HEADER.unpack_from(img, 0)
            if magic != MAGIC:
                raise CorruptSegmentError(f"bad snapshot magic {magic!r}")
            if version != FORMAT_VERSION:
                raise CorruptSegmentError(
                    f"snapshot format version {version}; this shmkeyspace reads {FORMAT_VERSION}"
                )
            ok = (
                total == length
                and fence_step > 0
                and slots >= 8
                and slots & (slots - 1) == 0
                and count < slots
                and order_len == 8 * count
                and arena_off >= HEADER_SIZE
                and arena_off + arena_len <= length
                and table_off % 8 == 0
                and table_off >= arena_off + arena_len
                and table_off + 16 * slots <= length
                and order_off % 4 == 0
                and order_off >= table_off + 16 * slots
                and order_off + order_len <= length
                and fence_off >= order_off + order_len
                and fence_off + fence_len <= length
            )
            if not ok:
                raise CorruptSegmentError("snapshot header describes regions outside the image")
            # The fences are parsed lazily and cached: copy them now and checksum the
            # copy, so the cached parse is of exactly the bytes that were verified.
            fence_region = bytes(img[fence_off : fence_off + fence_len])
            if checksum != index_checksum(
                img[:HEADER_SIZE],
                img[table_off : table_off + 16 * slots],
                img[order_off : order_off + order_len],
                fence_region,
            ):
                raise CorruptSegmentError("snapshot index checksum mismatch: the header or index is damaged")
        except BaseException:
            # Release the slice now: a traceback that outlives this call (a log
            # record holding the exception) would otherwise keep the mapping
            # exported, and its owner could not close it (a writer refusing a state
            # file read into its own segment: tests/test_state.py).
            img.release()
            raise
        self.buf = img
        self.revision = revision
        self.count = count
        self.arena = img[arena_off : arena_off + arena_len]
        self.arena_len = arena_len
        src = buf.obj
        if not (isinstance(src, (mmap.mmap, bytes)) and len(src) == buf.nbytes):
            src = bytes(buf)  # a view of something else: one private copy
        self.src = src
        # Offsets of the image and its regions in ``src`` (the compiled kernels' view).
        self.offset = offset
        self.arena_base = offset + arena_off
        self.table_off = offset + table_off
        self.order_off = offset + order_off
        self.table = img[table_off : table_off + 16 * slots].cast("Q")
        self.mask = slots - 1
        self.slots = slots  # read by the compiled kernel (_speedups.c)
        self.order = img[order_off : order_off + order_len].cast("I")
        self.fence_step = fence_step
        self._fence_region = fence_region
        self._fences: Optional[List[bytes]] = None

    def fences(self) -> List[bytes]:
        if self._fences is None:
            try:
                f = unpackb(self._fence_region)  # a private copy, made when it was verified
            except Exception as exc:
                raise CorruptSegmentError(f"undecodable fence index: {exc}") from None
            if not isinstance(f, list) or len(f) != (self.count + self.fence_step - 1) // self.fence_step:
                raise CorruptSegmentError("fence index does not match the entry count")
            if set(map(type, f)) - {bytes}:  # bisect would raise TypeError comparing them
                raise CorruptSegmentError("fence index holds a key that is not bytes")
            self._fences = f
        return self._fences

    def key_at(self, pos: int) -> bytes:
        off = self.order[2 * pos]
        end = off + self.order[2 * pos + 1]
        if end > self.arena_len:
            raise CorruptSegmentError(f"entry {pos} lies outside the arena")
        return raw_key(self.arena, off, end)

    def lower_bound(self, key: bytes) -> int:
        """Position of the first entry with key >= ``key``. O(log n)."""
        fences = self.fences()
        b = bisect.bisect_right(fences, key) - 1
        if b < 0:
            return 0
        lo = b * self.fence_step + 1  # fences[b] <= key, so the answer is > b*step or == it
        if fences[b] == key:
            return b * self.fence_step
        hi = min(self.count, lo - 1 + self.fence_step)
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.key_at(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def entry_sizes(self) -> List[Tuple[bytes, int]]:
        """``(raw key, entry bytes)`` of every entry, in key order. O(n): only keys are parsed."""
        lens = self.order[1::2].tolist()
        return [(self.key_at(i), lens[i]) for i in range(self.count)]

    def lookup(self, key: Any) -> Optional[list]:
        """The entry of ``key`` (a 6-item list) or None. O(1): one probe, one unpack."""
        if type(key) is str:
            kb = key.encode("utf-8")
            kq = key
        else:
            kb, kq = query_key(key)
        h = xxh3_64_intdigest(kb) or 1
        table = self.table
        mask = self.mask
        i = (h & mask) << 1
        sh = table[i]
        probes = 0
        while sh:
            if sh == h:
                ol = table[i + 1]
                off = ol & 0xFFFFFFFF
                end = off + (ol >> 32)
                if end > self.arena_len:
                    raise CorruptSegmentError(f"hash slot {i >> 1} points outside the arena")
                base = self.arena_base
                lst = unpackb(self.src[base + off : base + end])  # parse a copy, never shared memory
                if type(lst) is not list or len(lst) != 6:
                    raise CorruptSegmentError(f"entry at offset {off} is not a 6-field array")
                if lst[0] == kq:
                    return lst
            probes += 1
            if probes > mask:  # a full table can only be a corrupt one
                raise CorruptSegmentError("hash table has no empty slot")
            i = (i + 2) & (mask << 1 | 1)
            sh = table[i]
        return None

    def range(self, lo: bytes, hi: Optional[bytes]) -> List[list]:
        """Entries (6-item lists) with ``lo <= key < hi`` (``hi=None``: to the end), in key order.

        O(log n + k): two lower_bound searches and one unpack of the k entries.
        """
        i = self.lower_bound(lo)
        j = self.count if hi is None else self.lower_bound(hi)
        if j <= i:
            return []
        order = self.order
        offs = order[2 * i : 2 * j : 2].tolist()
        lens = order[2 * i + 1 : 2 * j : 2].tolist()
        start = offs[0]
        total = sum(lens)
        src, base = self.src, self.arena_base  # slices of src are private copies (class doc)
        n = j - i
        if offs[-1] + lens[-1] - start == total and offs == sorted(offs):
            # Entries lie back to back in key order (the arena is compacted in key
            # order): unpack them as one msgpack array, in C.
            if start + total > self.arena_len:
                raise CorruptSegmentError("range runs past the arena")
            lists = unpackb(b"\xdd" + n.to_bytes(4, "big") + src[base + start : base + start + total])
        else:
            if max(map(add, offs, lens)) > self.arena_len:
                raise CorruptSegmentError("range entry lies outside the arena")
            lists = [unpackb(src[base + o : base + o + m]) for o, m in zip(offs, lens)]
        if len(lists) != n:
            raise CorruptSegmentError("range unpacked to the wrong number of entries")
        # C-level checks: a Python call per entry was 40 % of a range.
        if set(map(type, lists)) != {list} or set(map(len, lists)) != {6}:
            raise CorruptSegmentError("range holds an entry that is not a 6-field array")
        return lists

    def lookup_raw(self, key: Any) -> Optional[bytes]:
        """The msgpack bytes of ``key``'s entry (a private copy), or None. O(1).

        For readers that decode entries themselves (``Reader.typed``); only the key
        is parsed here, so a value is checked by whoever decodes it.
        """
        kb, _ = query_key(key)
        h = xxh3_64_intdigest(kb) or 1
        table = self.table
        mask = self.mask
        i = (h & mask) << 1
        sh = table[i]
        probes = 0
        while sh:
            if sh == h:
                ol = table[i + 1]
                off = ol & 0xFFFFFFFF
                n = ol >> 32
                if off + n > self.arena_len:
                    raise CorruptSegmentError(f"hash slot {i >> 1} points outside the arena")
                base = self.arena_base
                raw = self.src[base + off : base + off + n]  # the copy every later step reads
                if raw_key(raw, 0, n) == kb:
                    return raw
            probes += 1
            if probes > mask:
                raise CorruptSegmentError("hash table has no empty slot")
            i = (i + 2) & (mask << 1 | 1)
            sh = table[i]
        return None

    def range_raw(self, lo: bytes, hi: Optional[bytes]) -> bytes:
        """The entries with ``lo <= key < hi`` as one msgpack array (bytes, a private copy).

        What :meth:`range` unpacks, left packed: an array32 header, then the
        entries' bytes in key order. O(log n + k).
        """
        i = self.lower_bound(lo)
        j = self.count if hi is None else self.lower_bound(hi)
        n = max(0, j - i)
        order = self.order
        offs = order[2 * i : 2 * j : 2].tolist()
        lens = order[2 * i + 1 : 2 * j : 2].tolist()
        if n and max(map(add, offs, lens)) > self.arena_len:
            raise CorruptSegmentError("range entry lies outside the arena")
        src, base = self.src, self.arena_base
        head = b"\xdd" + n.to_bytes(4, "big")
        if n and offs[-1] + lens[-1] - offs[0] == sum(lens) and offs == sorted(offs):
            return head + src[base + offs[0] : base + offs[-1] + lens[-1]]  # back to back
        return head + b"".join([src[base + o : base + o + m] for o, m in zip(offs, lens)])

    def release(self) -> None:
        for name in ("table", "order", "arena", "_fence_region", "buf"):
            mv = getattr(self, name, None)
            if isinstance(mv, memoryview):
                mv.release()
