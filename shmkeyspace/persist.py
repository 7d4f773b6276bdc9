"""The persist thread (fail static): the writer's state file, written off the publishing path.

Owns :class:`Persister`: when ``STATE_DIR/NAME.snap`` (format and checks:
``state.py``) is written, from what, and its counters. It promises:

* what it writes is a publication: parts captured at publish time, under
  ``keyspace.lock``, right after the image became visible;
* persisting never holds up a publication beyond that capture (one copy of the
  hash table; the append-only arena is referenced, not copied): the file is
  written by a thread of its own;
* at most one write every ``interval`` seconds, and only when something was
  published since the last one; a failed write is logged, counted (also in the
  control block, for ``stat`` and readers' Health) and retried next interval;
* one write at a time, and never an older revision over a newer one of the
  same cluster (the thread and :meth:`Persister.persist_now` may race);
* :meth:`Persister.persist_now` (the writer's stop) waits for a write in flight,
  so a daemon thread killed at exit never leaves a half-written file behind.

Locking: ``_cond`` (a Condition) guards ``_capture``, ``_dirty`` and
``_next_persist`` and wakes the thread (on the first change after a write, on a
capture, on stop); ``_dirty`` is also read without it on the publishing path,
which sets it under ``_cond`` only when it was clear. ``_write_lock`` serialises
file writes and guards ``_persisted``. Captures are taken under
``keyspace.lock`` (:meth:`Persister.published` runs with it held;
:meth:`Persister.persist_now` and the thread take it); ``_cond`` is taken inside
``keyspace.lock``, never the other way round.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Tuple

from . import publisher, state
from .errors import StateFileError
from .keyspace import KeySpace

if TYPE_CHECKING:
    from .builder import ImageBuilder
    from .publish import UpdatePublisher

#: Default seconds between two writes of the state file (``--persist-interval``).
DEFAULT_PERSIST_INTERVAL = 5.0

log = logging.getLogger(__name__)


class Persister:
    """Writes the state file of writer ``name`` from a thread of its own (see module doc).

    ``state_dir`` None: persisting is off (every method returns at once).
    ``publishing`` tells it whether the writer closed and how many keys the
    published image leaves out; ``stop`` ends the thread.
    """

    def __init__(
        self,
        name: str,
        keyspace: KeySpace,
        publisher: publisher.Publisher,
        publishing: UpdatePublisher,
        stop: threading.Event,
        *,
        state_dir: Optional[str],
        decoder_name: str,
        interval: float,
        mode: int,
        gid: Optional[int],
    ) -> None:
        self.name = name
        self.keyspace = keyspace
        self.publisher = publisher
        self.publishing = publishing
        self.state_dir = state_dir
        self.decoder_name = decoder_name
        #: Seconds between two writes of the state file (at most one per interval).
        self.interval = interval
        self.mode, self.gid = mode, gid
        self._stop = stop
        #: State files written, and failures to write one (logged; retried next interval;
        #: also in the control block, for ``stat`` and readers' Health).
        self.persists = 0
        self.persist_failures = 0
        self.last_persist_seconds = 0.0
        self._persist_ns = (0, 0)  # wall ns of the last write and of the last failure
        #: CPU seconds spent writing state files (persist thread) and capturing
        #: images for them (publishing thread), for the persist-cost figure.
        self.persist_cpu_seconds = 0.0
        self.capture_cpu_seconds = 0.0
        self._next_persist = 0.0
        self._dirty = False  # published since the last state file capture
        self._capture: Optional[Tuple[Any, ...]] = None
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._persisted: Tuple[int, int] = (0, 0)  # (cluster id, revision) of the last file written

    # -- told by the restore and resume (before the watch starts) -------------------
    def written(self, cluster_id: int, revision: int) -> None:
        """The state file holds (cluster_id, revision): nothing to write until something changes.

        The file is fresh: the next write waits an interval instead of competing
        with the catch-up for CPU (a 150 MB write at 1M keys).
        """
        self._persisted = (cluster_id, revision)
        self._next_persist = time.monotonic() + self.interval

    def behind(self) -> None:
        """The file on disk (if any) is behind what readers have: write it an interval from now."""
        self._dirty = True
        self._next_persist = time.monotonic() + self.interval

    def forget(self) -> None:
        """The next file may have a lower revision (another history, or the file was discarded)."""
        self._persisted = (0, 0)

    # -- the publishing side (under keyspace.lock) ----------------------------------
    def published(self, parts: list, total: int) -> None:
        """A publication of ``parts`` just became visible: wake the thread, capture when due."""
        if not self.state_dir:
            return
        if not self._dirty:
            with self._cond:
                self._dirty = True
                self._cond.notify_all()
        if self._capture is None and time.monotonic() >= self._next_persist:
            self._take_capture(parts, total)

    def _take_capture(self, parts: list, total: int) -> None:
        """Freeze ``parts`` for the persist thread (called under keyspace.lock, after a publication).

        The builder's arena only grows within an epoch (appends; rebuilds make a
        new bytearray), so its first ``len`` bytes are captured by reference and
        copied later in slices; every other mutable part (the hash table, which
        is rewritten in place) is copied now. Measured at 1M keys: ~5 ms (the
        32 MB table copy), once per persist interval.
        """
        c0 = time.thread_time()
        arena = self._builder().arena
        frozen = [(p, len(p)) if p is arena else (bytes(p) if isinstance(p, bytearray) else p) for p in parts]
        hdr = self.keyspace.header
        with self._cond:
            excluded = self.publishing.excluded_count
            self._capture = (frozen, total, hdr.cluster_id, hdr.revision, len(self._builder()), excluded)
            self._dirty = False
            self._next_persist = time.monotonic() + self.interval
            self._cond.notify_all()
        self.capture_cpu_seconds += time.thread_time() - c0

    # -- the thread -----------------------------------------------------------------
    def thread(self) -> threading.Thread:
        """The persist thread, not started (the caller keeps it, to join it at stop, and starts it)."""
        return threading.Thread(target=self._persist_loop, daemon=True, name="shmkeyspace-persist")

    def wake(self) -> None:
        """Wake the thread (it ends once ``stop`` is set)."""
        with self._cond:
            self._cond.notify_all()

    def _persist_loop(self) -> None:
        while True:
            with self._cond:
                while self._capture is None and not self._stop.is_set():
                    if self._dirty and time.monotonic() >= self._next_persist:
                        break  # changes published, none captured since: capture ourselves
                    # Notified on the first change after a write, on a capture and on stop.
                    wait = self._next_persist - time.monotonic() if self._dirty else self.interval
                    self._cond.wait(max(0.01, wait))
                cap, self._capture = self._capture, None
            if cap is None:
                if self._stop.is_set():
                    return
                with self.keyspace.lock:
                    if self.publishing.closed or not self.keyspace.header.cluster_id:
                        continue
                    parts, total = self._builder().parts()
                    self._take_capture(parts, total)
                continue
            self._write_state(cap)

    def _write_state(self, cap: Tuple[Any, ...]) -> None:
        # One write at a time, never an older revision over a newer one (the
        # persist thread and stop()'s final write may race).
        with self._write_lock:
            parts, total, cluster_id, revision, count, excluded = cap
            if (cluster_id, revision) == self._persisted[:2] or (
                cluster_id == self._persisted[0] and revision < self._persisted[1]
            ):
                return
            self._write_state_locked(parts, total, cluster_id, revision, count, excluded)

    def _write_state_locked(
        self, parts: list, total: int, cluster_id: int, revision: int, count: int, excluded: int
    ) -> None:
        t0 = time.monotonic()
        c0 = time.thread_time()
        try:
            state.write(
                self.state_dir or "",
                self.name,
                self.keyspace.root,
                self.decoder_name,
                cluster_id,
                revision,
                count,
                parts,
                total,
                mode=self.mode,
                gid=self.gid,
                excluded=excluded,
            )
        except (OSError, StateFileError) as exc:
            self.persist_failures += 1
            self._persist_ns = (self._persist_ns[0], time.time_ns())
            self.publisher.set_persist_stats(self.persists, self.persist_failures, *self._persist_ns)
            log.error("cannot write the state file of %r: %s (retrying next interval)", self.name, exc)
            self._dirty = True
            return
        self.persists += 1
        self._persist_ns = (time.time_ns(), self._persist_ns[1])
        self.publisher.set_persist_stats(self.persists, self.persist_failures, *self._persist_ns)
        self._persisted = (cluster_id, revision)
        self.last_persist_seconds = time.monotonic() - t0
        self.persist_cpu_seconds += time.thread_time() - c0
        log.debug(
            "persisted %r at revision %d (%d keys, %d bytes) in %.3f s; persist CPU so far %.3f s "
            "(writing) + %.3f s (capturing)",
            self.name,
            revision,
            count,
            total,
            self.last_persist_seconds,
            self.persist_cpu_seconds,
            self.capture_cpu_seconds,
        )

    def persist_now(self) -> None:
        """Write the state file now unless it already holds what is published (blocks).

        Waits for a write in flight first (stop() relies on this: a daemon
        thread killed mid-write at exit would leave the file behind).
        """
        if not self.state_dir:
            return
        with self.keyspace.lock:
            hdr = self.keyspace.header
            if (
                self.publishing.closed
                or not hdr.cluster_id
                or (hdr.cluster_id, hdr.revision) == self._persisted
            ):
                cap = None
            else:
                parts, total = self._builder().parts()
                self._take_capture(parts, total)
                with self._cond:
                    cap, self._capture = self._capture, None
        if cap is not None:
            self._write_state(cap)  # after the write in flight, if any (_write_lock)
        else:
            with self._write_lock:
                pass

    def _builder(self) -> ImageBuilder:
        return self.keyspace.key_values.builder
