"""The writer's KeySpace store: packed entries in an ImageBuilder, plus the pending batch.

Owns :class:`PackedStore` (what :attr:`KeySpace.key_values` is in a writer) and
:class:`PackedLoader` (the KeySpace ``store`` factory a load fills). It promises:

* the Gazette rules stay in :class:`KeySpace`: a store only records the upserts
  and removals that :meth:`KeySpace.apply` decides, as pending changes, until the
  writer's publication moves them into the builder (:meth:`PackedStore.take`);
* a KeyValue it receives carries the packed entry (``pack_entry``) as
  ``decoded``, so a writer keeps no decoded mirror, only what publishing needs;
* changes the builder could not take are put back (:meth:`PackedStore.restore`),
  newer pending ones winning, so a failed publication loses nothing;
* with a compiled applier (``apply.py``), :meth:`PackedStore.apply_events` is
  the KeySpace's event loop, one C call per batch, with the same outcome as
  KeySpace.apply's own loop (the reference); without one, ``apply_events`` is
  None and KeySpace.apply runs its loop.

Locking: a store has no lock of its own; it is the KeySpace's, so everything
here runs under ``keyspace.lock`` (KeySpace.apply, the writer's observer).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple

from .key_values import KeyValue
from .snapshot import MAX_IMAGE

if TYPE_CHECKING:
    from .apply import CompiledApply
    from .builder import Changes, ImageBuilder
# builder.py (and reader.py, where it gets its C kernels) is imported where first
# needed: a warm start publishes the state file before it needs a builder
# (~25 ms of a ~0.4 s warm start, measured with -X importtime).

_MISSING = object()


class PackedStore:
    """The writer's KeySpace store: an ImageBuilder plus the current batch's changes.

    KeySpace.apply records upserts and removals here (the Gazette rules stay in
    KeySpace); the Writer's observer moves them into the builder at publication.
    A KeyValue it receives carries the packed entry as ``decoded``.
    """

    __slots__ = ("builder", "pending", "t_first", "applier", "apply_events")

    def __init__(self, builder: ImageBuilder, applier: Optional[CompiledApply] = None) -> None:
        self.builder = builder
        self.pending: Changes = {}
        #: (thread CPU ns, perf_counter ns) of the batch's first event, for stats.
        self.t_first: Optional[tuple] = None
        self.applier = applier
        #: KeySpace.apply runs this instead of its own loop when it is not None.
        self.apply_events: Optional[Callable[..., int]] = None
        self.set_applier(applier)

    def set_applier(self, applier: Optional[CompiledApply]) -> None:
        """Use ``applier`` (None: KeySpace.apply's Python loop) from the next batch on."""
        self.applier = applier
        self.apply_events = None if applier is None else self._apply_events
        self.builder.compiled_updates = applier is not None

    def _apply_events(
        self,
        responses: Tuple[Any, ...],
        root_key: bytes,
        floor: int,
        excluded: Set[bytes],
        slow: Callable[[Any], Any],
        skip: Callable[[int, bytes, int, int], None],
        changed: Set[bytes],
        revision: int,
    ) -> int:
        """KeySpace.apply's loop over ``responses`` (see its hook), in C. O(events)."""
        fresh = self.t_first is None
        if fresh:
            self.t_first = (time.thread_time_ns(), time.perf_counter_ns())
        assert self.applier is not None
        rev = self.applier(
            responses, root_key, floor, self.pending, self.builder, excluded, slow, skip, changed, revision
        )
        if fresh and not changed:
            self.t_first = None  # no update follows: the batch's stats start at the next one
        return rev

    def __len__(self) -> int:
        n = len(self.builder)
        for k, p in self.pending.items():
            n += (p is not None) - (k in self.builder)
        return n

    def mod_revision(self, key: bytes) -> Optional[int]:
        if self.t_first is None:
            self.t_first = (time.thread_time_ns(), time.perf_counter_ns())
        p = self.pending.get(key, _MISSING)
        if p is _MISSING:
            return self.builder.mod_revision(key)
        return None if p is None else p[1]  # type: ignore[index]

    def upsert(self, kv: KeyValue) -> None:
        self.pending[kv.key] = (kv.decoded, kv.mod_revision)

    def remove(self, key: bytes) -> None:
        self.pending[key] = None

    def take(self) -> Changes:
        changes, self.pending = self.pending, {}
        return changes

    def discard(self) -> None:
        """Drop the pending changes (the writer stopped: they will never be published)."""
        self.pending = {}

    def restore(self, changes: Changes) -> None:
        """Put back changes the builder could not take (newer pending ones win)."""
        changes.update(self.pending)
        self.pending = changes


class PackedLoader:
    """KeySpace store loader: appends a load's packed entries straight into a new builder."""

    __slots__ = ("builder", "applier")

    def __init__(self, max_image: int = MAX_IMAGE, applier: Optional[CompiledApply] = None) -> None:
        from .builder import ImageBuilder

        self.applier = applier
        self.builder = ImageBuilder()
        self.builder.max_image = max_image
        self.builder.begin()

    def add(self, kv: KeyValue) -> None:
        self.builder.add_sorted(kv.key, kv.decoded)

    def add_page(self, kvs: Any, slow: Callable[[Any], Optional[KeyValue]]) -> Optional[List[bytes]]:
        """Append one load page's etcd KeyValues (in key order) with the compiled decode +
        pack; ``slow(kv)`` (the KeySpace's decode, which logs) takes any it defers, as
        the Python path would. Returns the keys left out; None without a compiled
        applier (the caller's loop then runs). Same entries, byte for byte, as that
        loop (``tests/test_apply_paths.py``): ~1 us a key less at 1M keys."""
        a = self.applier
        if a is None:
            return None
        pack, add = a.pack_one(), self.builder.add_sorted
        left: List[bytes] = []
        for kv in kvs:
            key = bytes(kv.key)
            p = pack(key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
            if p is None:
                dec = slow(kv)
                if dec is None:
                    left.append(key)
                    continue
                p = dec.decoded
            add(key, p)
        return left

    def finish(self) -> PackedStore:
        self.builder.finish(0)  # the revision is the KeySpace header's, set at publication
        return PackedStore(self.builder, self.applier)
