"""Derived state per published revision (Gazette's observers, for readers).

Owns the cache behind :meth:`Reader.derive`: for each function ``fn`` (by
identity) the value ``fn(view)`` last computed and the revision of the snapshot
view it was computed on. It promises:

* ``fn`` runs at most once per published revision per Reader, however many
  threads ask at once: one of them computes, the others wait for it and share
  the value (a computation that raised is not cached; the next caller retries);
* the value returned always belongs to the revision returned with it;
* a cached answer costs one load of the seq word plus a dict lookup (~0.3 us);
* ``fn`` gets a :class:`SnapshotView`; if the writer recycles that view's
  buffer while ``fn`` runs (two publications during a long computation), ``fn``
  is run again on a private copy of the then-current image (one memcpy), which
  never expires.

Keep ``fn`` a long-lived function (a module-level def or a bound method), not a
lambda made per call: the cache is keyed by the function object, and holds one
value per function until the Reader is closed.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, ContextManager, Dict, NamedTuple, Protocol, Tuple

from .errors import SnapshotExpiredError


class SnapshotSource(Protocol):
    """What a :class:`Deriver` needs of its Reader: views of one publication
    (reader.py imports this module, never the other way round)."""

    def snapshot(self, copy: bool = False) -> ContextManager[Any]: ...


class Derived(NamedTuple):
    """What :meth:`Reader.derive` returns: ``fn(view)`` and the revision of that view."""

    revision: int
    value: Any


class Deriver:
    """Per-Reader cache of derived values. Thread-safe (see module doc)."""

    def __init__(self, reader: SnapshotSource, seq: Callable[[], int]) -> None:
        self._reader = reader
        self._seq = seq  # the Reader's seq-word load
        # fn -> (seq seen before the computation, Derived)
        self._cache: Dict[Any, Tuple[int, Derived]] = {}
        #: Serialises computations (and the Reader calls they make: a Reader is
        #: not for concurrent use). Cached answers never take it.
        self._lock = threading.Lock()
        #: Computations run (for tests and metrics).
        self.computations = 0

    def get(self, fn: Callable[[Any], Any]) -> Derived:
        c = self._cache.get(fn)
        if c is not None and c[0] == self._seq():
            return c[1]
        with self._lock:
            seq = self._seq()
            c = self._cache.get(fn)
            if c is not None and c[0] == seq:
                return c[1]
            reader = self._reader
            with reader.snapshot() as view:
                if c is not None and c[1].revision == view.revision:
                    # Republished at the same revision (same keys and values).
                    self._cache[fn] = (seq, c[1])
                    return c[1]
                try:
                    self.computations += 1
                    d = Derived(view.revision, fn(view))
                except SnapshotExpiredError:
                    d = None
            if d is None:
                with reader.snapshot(copy=True) as view:
                    self.computations += 1
                    d = Derived(view.revision, fn(view))
                seq = -1  # taken before the copy's publication: let the next call re-check
            self._cache[fn] = (seq, d)
            return d

    def forget(self, fn: Callable[[Any], Any]) -> None:
        """Drop ``fn``'s cached value."""
        with self._lock:
            self._cache.pop(fn, None)
