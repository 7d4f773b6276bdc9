"""KeyValue and KeyValues: the decoded, key-ordered contents of a KeySpace.

Port of Gazette's ``keyspace/key_values.go``. ``KeyValues`` is ordered by the raw
etcd key (bytes, so the order is etcd's own) and holds each key at most once.
Instances handed out by a :class:`~shmkeyspace.keyspace.KeySpace` belong to it:
read them only while holding ``KeySpace.lock``, or take :meth:`KeyValues.copy`.

Complexities below are for n keys in the collection; the backing store is a
``sortedcontainers.SortedKeyList`` (O(log n) insert, remove and positional access).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union, overload

from sortedcontainers import SortedKeyList

from .errors import DuplicateKeyError, InvalidKeyError

#: A key as callers give it (as Reader accepts it); stored as bytes.
Key = Union[bytes, bytearray, memoryview, str]


class KeyValue(NamedTuple):
    """One etcd key-value with its decoded value.

    The raw etcd fields are kept verbatim (``key`` and ``value`` are bytes);
    ``decoded`` is what the KeySpace's decoder returned for ``value``.
    Immutable, so a KeyValue may be shared between copies of a KeyValues.
    """

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int
    decoded: Any


def to_key(key: Key) -> bytes:
    """Return ``key`` as bytes (str is encoded as UTF-8, etcd's convention; a
    bytearray or memoryview is copied, as Reader does)."""
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    raise InvalidKeyError(f"key must be str or bytes, not {type(key).__name__}")


_as_key = to_key  # for methods whose parameter is named to_key, as in Reader.range


def prefix_end(prefix: bytes) -> Optional[bytes]:
    """The smallest key greater than every key starting with ``prefix``.

    ``None`` means "no upper bound" (empty prefix, or a prefix of only 0xff bytes),
    matching etcd's ``GetPrefixRangeEnd``.
    """
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None


_by_key = attrgetter("key")


class KeyValues:
    """A sequence of :class:`KeyValue` ordered by key, unique on key.

    Supports ``len``, iteration, indexing and slicing (slices are KeyValues).
    """

    __slots__ = ("_list",)

    def __init__(self, items: Iterable[KeyValue] = ()) -> None:
        self._list = SortedKeyList(items, key=_by_key)
        # Uniqueness is an invariant: a duplicate would make search ambiguous.
        keys = [kv.key for kv in self._list]
        if len(set(keys)) != len(keys):
            dup = next(a for a, b in zip(keys, keys[1:]) if a == b)
            raise DuplicateKeyError(f"duplicate key in KeyValues: {dup!r}")

    # -- sequence protocol -------------------------------------------------
    def __len__(self) -> int:
        return len(self._list)

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self._list)

    @overload
    def __getitem__(self, i: int) -> KeyValue: ...
    @overload
    def __getitem__(self, i: slice) -> "KeyValues": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._from_sorted(self._list[i])
        return self._list[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyValues):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"KeyValues(<{len(self)} keys>)"

    @classmethod
    def _from_sorted(cls, items: Iterable[KeyValue]) -> "KeyValues":
        kv = cls.__new__(cls)
        kv._list = SortedKeyList(key=_by_key)
        kv._list.update(items)
        return kv

    @classmethod
    def loader(cls) -> "KeyValuesLoader":
        """A loader that builds a KeyValues from items added in key order (KeySpace's load)."""
        return KeyValuesLoader()

    # -- Gazette's API -----------------------------------------------------
    def search(self, key: Key) -> Tuple[int, bool]:
        """Return ``(index, found)``: where ``key`` is, or would be inserted. O(log n)."""
        k = to_key(key)
        i = self._list.bisect_key_left(k)
        return i, i < len(self._list) and self._list[i].key == k

    def get(self, key: Key) -> Optional[KeyValue]:
        """The KeyValue of ``key``, or None. O(log n)."""
        i, found = self.search(key)
        return self._list[i] if found else None

    def range(self, from_key: Key, to_key: Optional[Key]) -> "KeyValues":
        """Keys in ``[from_key, to_key)``; ``to_key=None`` means unbounded (as
        :meth:`Reader.range`). O(log n + k)."""
        lo = self._list.bisect_key_left(_as_key(from_key))
        hi = len(self._list) if to_key is None else self._list.bisect_key_left(_as_key(to_key))
        return self._from_sorted(self._list.islice(lo, max(lo, hi)))

    def prefixed(self, prefix: Key) -> "KeyValues":
        """Keys starting with ``prefix``. O(log n + k)."""
        p = to_key(prefix)
        return self.range(p, prefix_end(p))

    def mod_revision(self, key: Key) -> Optional[int]:
        """The mod_revision of ``key``, or None if absent. O(log n)."""
        kv = self.get(key)
        return None if kv is None else kv.mod_revision

    def copy(self) -> "KeyValues":
        """An independent KeyValues holding the same (immutable) KeyValue items. O(n)."""
        return self._from_sorted(self._list)

    def equal_key_revisions(self, other: "KeyValues") -> bool:
        """True iff both hold the same keys at the same create and mod revisions. O(n)."""
        if len(self) != len(other):
            return False
        for a, b in zip(self._list, other._list):
            if a.key != b.key or a.create_revision != b.create_revision or a.mod_revision != b.mod_revision:
                return False
        return True

    # -- mutation, used by KeySpace under its lock ---------------------------
    def upsert(self, kv: KeyValue) -> Optional[KeyValue]:
        """Insert ``kv``, replacing the entry of the same key; return the replaced one."""
        i, found = self.search(kv.key)
        old = None
        if found:
            old = self._list[i]
            del self._list[i]
        self._list.add(kv)
        return old

    def remove(self, key: Key) -> Optional[KeyValue]:
        """Remove ``key``; return the removed entry or None."""
        i, found = self.search(key)
        if not found:
            return None
        old = self._list[i]
        del self._list[i]
        return old


class KeyValuesLoader:
    """Collects a load's KeyValues (added in key order); :meth:`finish` makes the KeyValues."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: List[KeyValue] = []

    def add(self, kv: KeyValue) -> None:
        self._items.append(kv)

    def finish(self) -> KeyValues:
        kvs = KeyValues._from_sorted(self._items)
        self._items = []
        return kvs
