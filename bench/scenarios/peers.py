"""The peers shmkeyspace is measured against, each holding the same data.

* :class:`LmdbPeer` - py-lmdb, key -> the same msgpack-packed entry
  ``[key, decoded, create_revision, mod_revision, version, lease]`` the snapshot
  stores; a read transaction per lookup (and per batch), ``buffers=True`` so
  values are unpacked straight from the map (its fastest read path), with the
  same unpack function the Reader uses (:data:`READER_UNPACKB`), so the
  comparison is about storage and lookup, not about the msgpack library.
* :class:`DictPeer` - a plain in-process dict of key -> decoded (the limit), plus
  a sorted key list for ranges.
* :class:`EtcdPeer` - a direct etcd read per query with the python-etcd3 API
  (pyetcd) and ``json.loads`` of the value, as a service without a mirror does.
* :class:`SmdPeer` - ``shared-memory-dict`` from PyPI (pickles the whole dict
  into one shared-memory block; no ordered queries).
"""

from __future__ import annotations

import bisect
import json
import os
import pickle
import shutil
import tempfile
import uuid
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import msgpack

from shmkeyspace.key_values import prefix_end

try:  # whatever the Reader unpacks entries with (msgpack, or a faster drop-in)
    from shmkeyspace.snapshot import unpackb as READER_UNPACKB
except ImportError:
    READER_UNPACKB = msgpack.unpackb
UNPACKER_NAME = f"{READER_UNPACKB.__module__ or '?'}.{READER_UNPACKB.__name__}"


class LmdbPeer:
    """py-lmdb environment in a temporary directory (removed by :meth:`close`)."""

    def __init__(self, path: Optional[str] = None, readonly: bool = False, unpackb: Any = None) -> None:
        import lmdb

        self.unpackb = unpackb or READER_UNPACKB
        self.own = path is None
        self.path = path or tempfile.mkdtemp(prefix="shmks-bench-lmdb-")
        self.env = lmdb.open(
            self.path,
            map_size=1 << 36,
            readonly=readonly,
            lock=True,
            sync=False,
            metasync=False,
            max_readers=256,
        )

    def fill(self, items: Iterable[Tuple[bytes, bytes]]) -> None:
        """Store (raw key, packed entry) pairs given in key order."""
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(items, append=True)
        self.env.sync(True)

    # -- queries (each opens its own read transaction) ------------------------------------
    def get(self, key: bytes) -> Any:
        with self.env.begin(buffers=True) as txn:
            v = txn.get(key)
            return None if v is None else self.unpackb(v)

    def get_batch(self, keys: Sequence[bytes]) -> List[Any]:
        with self.env.begin(buffers=True) as txn:
            get, unpackb = txn.get, self.unpackb
            return [unpackb(get(k)) for k in keys]

    def range(self, lo: bytes, count: int) -> List[Any]:
        """``count`` entries from ``lo``: cursor set_range + next + unpack."""
        with self.env.begin(buffers=True) as txn:
            return _scan_count(txn.cursor(), lo, count, self.unpackb)

    def range_to(self, lo: bytes, hi: bytes) -> List[Any]:
        """Entries with lo <= key < hi."""
        with self.env.begin(buffers=True) as txn:
            return _scan_below(txn.cursor(), lo, hi, self.unpackb)

    def prefixed(self, p: bytes) -> List[Any]:
        return _prefixed(self, p)

    def long_txn(self) -> "LmdbLongTxn":
        """The same environment read through ONE read transaction kept open for
        every query: py-lmdb's fastest mode (no txn begin/end per query)."""
        return LmdbLongTxn(self.env, self.unpackb)

    def with_unpacker(self, unpackb: Any) -> "LmdbPeer":
        """The same environment read with another unpack function (closing it is a no-op)."""
        other = object.__new__(LmdbPeer)
        other.env, other.path, other.own, other.unpackb = self.env, self.path, False, unpackb
        other.close = lambda: None
        return other

    def close(self) -> None:
        self.env.close()
        if self.own:
            shutil.rmtree(self.path, ignore_errors=True)


class LmdbLongTxn:
    """py-lmdb with one long-lived read transaction (``buffers=True``) for all queries.

    ``get`` is a lambda with its callables bound as defaults: the cheapest Python
    composition of ``txn.get`` and the unpacker.
    """

    def __init__(self, env: Any, unpackb: Any) -> None:
        self.txn = env.begin(buffers=True)
        self.unpackb = unpackb
        self.get = lambda k, g=self.txn.get, u=unpackb: u(g(k))

    def range(self, lo: bytes, count: int) -> List[Any]:
        return _scan_count(self.txn.cursor(), lo, count, self.unpackb)

    def range_to(self, lo: bytes, hi: bytes) -> List[Any]:
        return _scan_below(self.txn.cursor(), lo, hi, self.unpackb)

    def prefixed(self, p: bytes) -> List[Any]:
        return _prefixed(self, p)

    def close(self) -> None:
        self.txn.abort()


# One cursor scan for both lmdb peers (a transaction per query, or one long one):
# the peers differ only in the transaction the cursor comes from.
def _scan_count(cur: Any, lo: bytes, count: int, unpackb: Any) -> List[Any]:
    """Up to ``count`` entries from ``lo``: set_range, then next + unpack."""
    out: List[Any] = []
    if not cur.set_range(lo):
        return out
    value, nxt = cur.value, cur.next
    for _ in range(count):
        out.append(unpackb(value()))
        if not nxt():
            break
    return out


def _scan_below(cur: Any, lo: bytes, hi: bytes, unpackb: Any) -> List[Any]:
    """Entries with lo <= key < hi."""
    out: List[Any] = []
    if not cur.set_range(lo):
        return out
    key, value, nxt = cur.key, cur.value, cur.next
    while bytes(key()) < hi:
        out.append(unpackb(value()))
        if not nxt():
            break
    return out


def _prefixed(peer: Any, p: bytes) -> List[Any]:
    end = prefix_end(p)
    return peer.range_to(p, end) if end is not None else peer.range(p, 1 << 62)


class DictPeer:
    """key (str) -> decoded, and the sorted keys for ordered queries."""

    def __init__(self, items: Iterable[Tuple[str, Any]]) -> None:
        self.d = dict(items)
        self.keys = sorted(self.d)
        self.get = self.d.get

    def range_to(self, lo: str, hi: str) -> List[Any]:
        keys = self.keys
        i = bisect.bisect_left(keys, lo)
        j = bisect.bisect_left(keys, hi, i)
        d = self.d
        return [d[k] for k in keys[i:j]]

    def prefixed(self, p: str) -> List[Any]:
        # '\U0010ffff' sorts after every character a key can hold after the prefix.
        return self.range_to(p, p + "\U0010ffff")


class EtcdPeer:
    """A query per request straight to etcd (pyetcd, python-etcd3 API) + json.loads."""

    def __init__(self, client: Any) -> None:
        self.c = client

    def get(self, key: str) -> Any:
        value, _meta = self.c.get(key)
        return None if value is None else json.loads(value)

    def range_to(self, lo: str, hi: str) -> List[Any]:
        return [json.loads(v) for v, _ in self.c.get_range(lo, hi)]

    def prefixed(self, p: str) -> List[Any]:
        return [json.loads(v) for v, _ in self.c.get_prefix(p)]


class SmdPeer:
    """``shared_memory_dict.SharedMemoryDict`` holding key -> decoded (pickle serializer)."""

    def __init__(self, items: Iterable[Tuple[str, Any]]) -> None:
        from shared_memory_dict import SharedMemoryDict

        d = dict(items)
        size = len(pickle.dumps(d, pickle.HIGHEST_PROTOCOL)) + (1 << 20)
        self.size = size
        # The run tag in the name lets the smoke test tell its own leftovers from
        # another bench running on the same host.
        tag = os.environ.get("SHMKEYSPACE_BENCH_TAG", "")
        self.smd = SharedMemoryDict(name=f"shmksb{tag}{uuid.uuid4().hex[:10]}", size=size)
        self.smd.update(d)  # one pickle of everything; per-key __setitem__ would be O(n^2)
        self.get = self.smd.get

    def close(self) -> None:
        shm = self.smd.shm
        self.smd.cleanup()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def smd_available() -> Optional[str]:
    """None if shared-memory-dict imports, else why not."""
    try:
        import shared_memory_dict  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"not installed ({type(exc).__name__})"
    return None


def lmdb_path_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
