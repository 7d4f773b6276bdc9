"""The history check: is etcd's history the one a restored snapshot was taken from?

Owns :func:`differs`, which the resume (``resume.py``) runs once etcd answers
with the snapshot's cluster id and a revision not behind the snapshot's, before
it resumes the watch instead of loading in full. It promises:

* a non-empty answer (the reason, for the log) whenever a difference is seen at
  the snapshot's revision R: then the writer loads in full and starts a new
  history epoch;
* "" when etcd compacted past R (the watch then finds the compaction and
  reloads);
* bounded cost: one point read, one count-only Range and :data:`HISTORY_SAMPLE`
  point reads, all at R;
* no state: it reads etcd and the builder and changes neither (a value that no
  longer decodes is a difference, not a decode failure of the mirror).

Locking: none of its own. The builder it reads is the writer's store, not
published from before the watch starts, so it holds still while this runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Tuple

from . import state
from .key_values import KeyValue, prefix_end

if TYPE_CHECKING:
    from .builder import ImageBuilder

#: Keys of the restored snapshot read back from etcd, with values, by the
#: history check (evenly spaced in key order, plus the most recently modified).
HISTORY_SAMPLE = 32


def differs(
    client: Any,
    root: str,
    root_key: bytes,
    sf: state.StateFile,
    fingerprint: Tuple[bytes, int, int, int],
    b: ImageBuilder,
    pack: Callable[[KeyValue], bytes],
) -> str:
    """Why etcd's history disagrees with the restored snapshot at its revision R ("" if it agrees).

    ``sf`` describes the snapshot, ``fingerprint`` is (key, create, mod, version)
    of its most recently modified key, ``b`` the builder that took it over, and
    ``pack`` decodes and packs a KeyValue as the writer does.

    A cluster id is not proof of identity: a cluster recreated from an empty
    data dir under the same flags gets the same id (measured), and reaches R
    with other keys. So, all at revision R:

    * the most recently modified key must have the same create/mod revision
      and version (one point read);
    * the key count under the prefix must be the snapshot's, plus at most the
      keys it left out (decode failures) — a count-only Range, which walks
      etcd's index: ~0.3 s at 1M keys, measured;
    * :data:`HISTORY_SAMPLE` keys evenly spaced in key order must each be
      there with the same revisions, lease and value (decoded and packed
      again, compared byte for byte): point reads, ~1 ms each.

    Any difference, or a decode that fails now, means a full load. What this
    cannot see: a cluster recreated with the same number of keys, under the
    same revisions, that differs only in keys the sample missed. Compacted
    past R: "" (the watch will then find the compaction and reload).
    """
    rev = sf.revision
    try:
        key, c, m, v = fingerprint
        resp = client.get_response(key, revision=rev)
        kvs = list(resp.kvs)
        got = (int(kvs[0].create_revision), int(kvs[0].mod_revision), int(kvs[0].version)) if kvs else None
        if got != (c, m, v):
            return (
                f"etcd's history differs from the snapshot's: key {key!r} at revision {rev} is "
                f"{'absent' if got is None else 'create/mod/version %d/%d/%d' % got} in etcd, "
                f"{c}/{m}/{v} in the snapshot (a new cluster with the same id?)"
            )
        n = int(
            client.get_range_response(
                root_key, prefix_end(root_key) or b"\0", count_only=True, revision=rev
            ).count
        )
        slack = sf.excluded if sf.excluded < state.MAX_EXCLUDED else n
        if not sf.count <= n <= sf.count + slack:
            return (
                f"etcd's history differs from the snapshot's: etcd has {n} keys under {root!r} "
                f"at revision {rev}, the snapshot {sf.count}"
                + (f" (and {sf.excluded} left out)" if sf.excluded else "")
            )
        for k in b.sample_keys(HISTORY_SAMPLE):
            why = _sample_differs(client, b, k, rev, pack)
            if why:
                return f"etcd's history differs from the snapshot's: key {k!r} at revision {rev} {why}"
    except Exception as exc:
        if "compacted" in str(exc).lower() or "compacted" in _details(exc).lower():
            return ""
        raise
    return ""


def _sample_differs(
    client: Any, b: ImageBuilder, key: bytes, rev: int, pack: Callable[[KeyValue], bytes]
) -> str:
    """How etcd's ``key`` at ``rev`` differs from the builder's entry ("" if it does not)."""
    kvs = list(client.get_response(key, revision=rev).kvs)
    if not kvs:
        return "is absent in etcd"
    e = kvs[0]
    kv = KeyValue(
        bytes(e.key),
        bytes(e.value),
        int(e.create_revision),
        int(e.mod_revision),
        int(e.version),
        int(e.lease),
        None,
    )
    try:
        packed = pack(kv)  # a probe, not a value the mirror rejected: not counted as a decode failure
    except Exception as exc:
        return f"does not decode now ({type(exc).__name__})"
    if packed != b.packed(key):
        return (
            f"has another value or revisions in etcd (create/mod/version {kv.create_revision}/"
            f"{kv.mod_revision}/{kv.version})"
        )
    return ""


def _details(exc: BaseException) -> str:
    d = getattr(exc, "details", None)
    try:
        return str(d()) if callable(d) else ""
    except Exception:
        return ""
