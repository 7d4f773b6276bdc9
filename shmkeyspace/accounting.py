"""Per-prefix byte accounting: which parts of the mirror the shared memory holds.

Owns the grouping of keys into prefixes (:func:`prefix_of`: a key's directory,
cut at ``depth`` path segments from the start of the key) and
:class:`PrefixBytes`, the writer's running totals of keys and packed-entry
bytes per prefix. It promises:

* one grouping for everyone: ``shmkeyspace stat --prefixes`` (computed from a
  published snapshot, :func:`account`) and the writer's metrics
  (``shmkeyspace_writer_prefix_bytes``, from :class:`PrefixBytes`) group a key
  the same way, so the two agree on a quiet snapshot;
* bytes are what the image holds for an entry (the packed msgpack array: key,
  decoded value, revisions), so a writer-side transform (``--transform``,
  a projection) shows up here as the bytes it saved;
* :class:`PrefixBytes` costs nothing per key (no per-key object): an update of k
  keys is O(k) (one hash probe each, for the old size), a full load or a
  restore is one O(n) pass. It is off unless ``account_depth`` is given.

Depth counts from the start of the key, not from the writer's prefix (a
reader does not know the prefix, and the two must agree): with depth 2,
``/services/a`` counts under ``/services/`` (a leaf is grouped under its
directory, so a flat prefix of a million keys is one group, not a million) and
``/services/x/y/z`` under ``/services/x/``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

#: Groups the metrics export at most (the largest by bytes); the rest are summed
#: into one ``(other)`` series, so a deep layout cannot explode label cardinality.
MAX_SERIES = 100
OTHER = "(other)"


def prefix_of(key: bytes, depth: int) -> bytes:
    """The group of ``key``: its directory, at most ``depth`` path segments deep. O(len(key))."""
    body = key.lstrip(b"/")
    lead = key[: len(key) - len(body)]
    dirs = body.split(b"/")[:-1][:depth]  # the last segment is the leaf's name
    return lead + b"".join(d + b"/" for d in dirs)


def account(sizes: Iterable[Tuple[bytes, int]], depth: int) -> Dict[bytes, List[int]]:
    """``{prefix: [keys, bytes]}`` of ``(key, entry bytes)`` pairs. O(n)."""
    out: Dict[bytes, List[int]] = {}
    for k, n in sizes:
        p = prefix_of(k, depth)
        t = out.get(p)
        if t is None:
            out[p] = [1, n]
        else:
            t[0] += 1
            t[1] += n
    return out


def top(groups: Dict[bytes, List[int]], limit: int = MAX_SERIES) -> List[Tuple[str, int, int]]:
    """``(prefix, keys, bytes)``, largest bytes first; past ``limit`` summed into :data:`OTHER`."""
    rows = sorted(groups.items(), key=lambda kv: (-kv[1][1], kv[0]))
    out = [(p.decode("utf-8", "backslashreplace"), t[0], t[1]) for p, t in rows[:limit]]
    rest = rows[limit:]
    if rest:
        out.append((OTHER, sum(t[0] for _, t in rest), sum(t[1] for _, t in rest)))
    return out


class PrefixBytes:
    """The writer's keys and bytes per prefix, kept with its ImageBuilder.

    Locking: none of its own; the writer calls it under ``keyspace.lock`` (the
    publishing observer), and a metrics scrape reads :meth:`snapshot`, a copy.
    """

    def __init__(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"account depth must be >= 0, got {depth}")
        self.depth = depth
        self._groups: Dict[bytes, List[int]] = {}
        self._builder: Any = None  # the builder the totals are of

    def before(self, builder: Any, changes: Iterable[bytes]) -> Optional[Dict[bytes, int]]:
        """The current entry sizes of ``changes``' keys, to call before the builder applies them.

        None when the totals are not of ``builder`` (a load or a restore replaced
        it): :meth:`after` then recounts. O(k).
        """
        if builder is not self._builder:
            return None
        return {k: builder.entry_size(k) for k in changes}

    def after(self, builder: Any, old: Optional[Dict[bytes, int]]) -> None:
        """Account for the applied changes whose old sizes :meth:`before` returned (None: recount, O(n))."""
        if old is None:
            self._groups = account(builder.entry_sizes(), self.depth)
            self._builder = builder
            return
        groups, depth = self._groups, self.depth
        for k, was in old.items():
            now = builder.entry_size(k)
            if now == was:
                continue
            p = prefix_of(k, depth)
            t = groups.setdefault(p, [0, 0])
            t[0] += (now > 0) - (was > 0)
            t[1] += now - was
            if t[0] == 0:
                del groups[p]

    def snapshot(self) -> Dict[bytes, List[int]]:
        """A copy of ``{prefix: [keys, bytes]}`` (for scrapes, from another thread)."""
        return {p: list(t) for p, t in list(self._groups.items())}

    def _check(self, builder: Any) -> None:
        """Assert the totals equal a recount of ``builder`` (tests; O(n))."""
        assert self._groups == account(builder.entry_sizes(), self.depth), "prefix totals drifted"
