"""Writer: one process per snapshot name per host that mirrors etcd into shared memory.

Owns a :class:`KeySpace` (load + watch of one prefix, with Gazette's rules)
whose store is an :class:`ImageBuilder` of packed entries, and the
:class:`Publisher` of the name. It promises:

* exclusivity: constructing a second Writer for a live name raises
  WriterExistsError naming the running writer's pid;
* per key it keeps what publishing needs (the packed entry and its
  mod_revision), not a decoded mirror: the KeySpace's decoder is the user's
  decoder followed by :func:`pack_entry`, so a value msgpack cannot carry is
  rejected like any decode failure (logged, key left out, recoverable);
* every KeySpace update becomes one publication, made as an observer (under the
  KeySpace lock); the changed keys of each are in :attr:`PublishStats.changed_keys`;
* a failed publication (a full /dev/shm, the image size limit) is logged and
  counted; the changes stay pending in the store, the last snapshot stays
  published, and the publication is retried at the next update or heartbeat:
  the writer never dies of it, and what it publishes is always a whole state;
* a heartbeat every ``heartbeat_interval`` seconds from the start of the load,
  so readers can tell a live writer from a dead one;
* each publication carries the change feed (feed.py): the keys the last
  ``changes_keep`` updates changed, at most ``changes_bytes`` of them, and wakes
  readers sleeping on the seq word (futex.py);
* the time of its last contact with etcd in the control block, beside its
  ``stale_after``, so readers can tell a live but cut-off writer
  (``Health.stale``); with no contact for ``stale_after`` it reconnects, to the
  next of its endpoints (see :meth:`KeySpace.watch`).

Lifecycle: :meth:`run` blocks (load, then watch) and raises the fatal error,
also kept in :attr:`error`; :meth:`start` runs it on a thread once loaded;
:meth:`stop` ends it. ``on_publish(stats)`` is called after every publication.
On exit the segments stay (readers keep the last snapshot and see the writer as
dead; a restarted writer takes over in place) unless ``unlink_on_exit``.

Fail static (``state_dir``): the writer persists what it publishes to
``STATE_DIR/NAME.snap`` (format and checks: ``state.py``) at most every
``persist_interval`` seconds when something changed, and on :meth:`stop`. The
file is written by a thread of its own from parts captured at publish time, so
persisting never holds up a publication beyond that capture (one copy of the
hash table; the append-only arena is referenced, not copied). On start a valid
file is published at once, before etcd is asked anything, with the control
block's source word set to "disk": read into a new segment no reader can see
yet and checked there, every entry included (a bad file never reaches
readers), while another thread connects; the writer then takes that image
over as its own state (ImageBuilder.adopt). Once etcd answers with the same cluster id
and a revision not behind the file's, the watch resumes from the file's
revision + 1 and the source becomes "etcd" when the mirror has caught up. A
full load happens only when etcd compacted past the file's revision, or the
cluster or its history differ (the file is discarded, with the reason logged).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, List, Optional, Tuple

from . import segment, state
from .errors import (
    CorruptSegmentError,
    ImageTooLargeError,
    InvalidSettingError,
    SegmentFullError,
    SegmentNotFoundError,
    StateFileError,
    UntrustedSegmentError,
    WriterLostError,
)
from .feed import DEFAULT_BYTES, DEFAULT_KEEP, ChangeLog
from .key_values import KeyValue, prefix_end
from .keyspace import DEFAULT_APPLY_DELAY, DEFAULT_STALE_AFTER, DEFAULT_WATCH_SILENCE, Header, KeySpace
from .snapshot import MAX_IMAGE, ImageView, pack_entry

if TYPE_CHECKING:
    from .builder import Changes, ImageBuilder
# builder.py (and reader.py, where it gets its C kernels) is imported where first
# needed: a warm start publishes the state file before it needs a builder
# (~25 ms of a ~0.4 s warm start, measured with -X importtime).

#: Default seconds between two writes of the state file (``--persist-interval``).
DEFAULT_PERSIST_INTERVAL = 5.0
#: Default ``view_grace`` (``--view-grace``): every snapshot view stays valid at
#: least this long. A buffer readers left is rewritten only this long after, so
#: under sustained churn publications are spaced by it (at most this much more
#: latency, measured in bench/view_grace.py); idle or slow changes pay nothing.
DEFAULT_VIEW_GRACE = 0.1

log = logging.getLogger(__name__)
_MISSING = object()


@dataclass(frozen=True)
class PublishStats:
    """What one publication did, handed to ``on_publish`` (times in ns)."""

    revision: int
    keys: int
    image_bytes: int
    #: Keys changed by this publication; None for a full load or reload.
    changed_keys: Optional[Collection[bytes]]
    #: Wall clock (perf_counter_ns) when the image became visible to readers.
    t_published: int
    #: Thread CPU / wall time from the first event of the batch to publication
    #: (KeySpace.apply's decode + pack, then the builder and the copy).
    cpu_batch: int
    wall_batch: int
    #: The observer's part: builder update, parts (index + checksum), copy to shm.
    cpu_apply: int
    cpu_parts: int
    cpu_publish: int
    wall_apply: int
    wall_parts: int
    wall_publish: int
    wall_total: int
    publications: int
    publish_failures: int

    @property
    def changed(self) -> Optional[int]:
        return None if self.changed_keys is None else len(self.changed_keys)


class PackedStore:
    """The writer's KeySpace store: an ImageBuilder plus the current batch's changes.

    KeySpace.apply records upserts and removals here (the Gazette rules stay in
    KeySpace); the Writer's observer moves them into the builder at publication.
    A KeyValue it receives carries the packed entry as ``decoded``.
    """

    __slots__ = ("builder", "pending", "t_first")

    def __init__(self, builder: ImageBuilder) -> None:
        self.builder = builder
        self.pending: Changes = {}
        #: (thread CPU ns, perf_counter ns) of the batch's first event, for stats.
        self.t_first: Optional[tuple] = None

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

    def restore(self, changes: Changes) -> None:
        """Put back changes the builder could not take (newer pending ones win)."""
        changes.update(self.pending)
        self.pending = changes


class _PackedLoader:
    """KeySpace store loader: appends a load's packed entries straight into a new builder."""

    __slots__ = ("builder",)

    def __init__(self, max_image: int = MAX_IMAGE) -> None:
        from .builder import ImageBuilder

        self.builder = ImageBuilder()
        self.builder.max_image = max_image
        self.builder.begin()

    def add(self, kv: KeyValue) -> None:
        self.builder.add_sorted(kv.key, kv.decoded)

    def finish(self) -> PackedStore:
        self.builder.finish(0)  # the revision is the KeySpace header's, set at publication
        return PackedStore(self.builder)


class Writer:
    """Mirror etcd keys under ``prefix`` into the snapshot ``name``.

    Either pass a python-etcd3-API ``client``, or ``endpoints`` (plus any keyword
    of :func:`shmkeyspace.etcd.connect` in ``connect_args``).
    """

    def __init__(
        self,
        name: str,
        prefix: str,
        *,
        client: Any = None,
        endpoints: Optional[str] = None,
        connect_args: Optional[Dict[str, Any]] = None,
        decoder: Optional[Callable[[KeyValue], Any]] = None,
        apply_delay: float = DEFAULT_APPLY_DELAY,
        mode: int = 0o600,
        gid: Optional[int] = None,
        heartbeat_interval: float = 0.5,
        unlink_on_exit: bool = False,
        on_publish: Optional[Callable[[PublishStats], None]] = None,
        max_image_bytes: int = MAX_IMAGE,
        state_dir: Optional[str] = None,
        persist_interval: float = DEFAULT_PERSIST_INTERVAL,
        decoder_name: Optional[str] = None,
        changes_keep: int = DEFAULT_KEEP,
        changes_bytes: int = DEFAULT_BYTES,
        stale_after: float = DEFAULT_STALE_AFTER,
        watch_silence: Optional[float] = DEFAULT_WATCH_SILENCE,
        view_grace: float = DEFAULT_VIEW_GRACE,
    ) -> None:
        if client is None and endpoints is None:
            raise InvalidSettingError("Writer needs an etcd client or endpoints")
        if not stale_after > 0:
            raise InvalidSettingError(f"stale_after must be > 0 seconds, got {stale_after!r}")
        if watch_silence is not None and not watch_silence >= 0:
            raise InvalidSettingError(
                f"watch_silence must be >= 0 seconds (0: no bound), got {watch_silence!r}"
            )
        #: A watch stream silent this long (no event, no progress notification) is
        #: re-opened although reads succeed (KeySpace.watch); None or 0: no bound.
        self.watch_silence = watch_silence or None
        self._max_image = max_image_bytes
        # validates prefix before any side effect
        self.keyspace = KeySpace(prefix, self._decode, store=lambda: _PackedLoader(self._max_image))
        self.changelog = ChangeLog(changes_keep, changes_bytes)  # validates the sizes
        self.keyspace.watch_apply_delay = apply_delay
        self.name = segment.validate_name(name)
        self._user_decoder = decoder or (lambda kv: kv.value)
        self._verify = not getattr(decoder, "msgpack_safe", decoder is None)
        self._client = client
        self._own_client = client is None
        self._endpoints = endpoints
        self._connect_args = dict(connect_args or {})
        self._failover: Any = None  # etcd.Failover over the endpoints, when we own the client
        self.stale_after = stale_after
        if persist_interval <= 0:
            raise InvalidSettingError(f"persist_interval must be > 0 seconds, got {persist_interval!r}")
        #: Recorded in the state file; a file written under another decoder is refused.
        self.decoder_name = decoder_name or _callable_name(decoder)
        # Checked before any segment exists: a writer that cannot start leaves nothing behind.
        self.state_dir = state.prepare_dir(state_dir) if state_dir else None
        self.publisher = segment.Publisher(name, mode=mode, gid=gid, view_grace=view_grace)
        #: What the published images are a mirror of (segment.identity): a restarted
        #: writer takes its predecessor's image over only when this matches.
        self.identity = segment.identity(self.keyspace.root_key, self.decoder_name)
        prev = self.publisher.previous
        #: (cluster id, revision, epoch) of the last publication on this name, this
        #: writer's or its predecessor's: the floor revisions must not go below
        #: without raising the epoch (see _next_epoch).
        self._last_pub: Tuple[int, int, int] = (
            (prev.cluster_id, prev.revision, prev.epoch) if prev is not None else (0, 0, 0)
        )
        if prev is not None and prev.identity != self.identity:
            # Another prefix or decoder under this name: what follows is not a
            # continuation of what readers have.
            self._last_pub = (0, 0, prev.epoch + 1)
        #: Set when the writer lost its name (WriterLostError): run() raises it.
        self._fatal: Optional[BaseException] = None
        # The resume found etcd's history other than the snapshot's: the full load
        # that follows starts a new epoch whatever its revision.
        self._history_reset = False
        self.publisher.set_heartbeat_interval(heartbeat_interval)
        self.publisher.set_stale_after(stale_after)
        self.keyspace.on_contact = self.publisher.set_contact
        self.heartbeat_interval = heartbeat_interval
        self.unlink_on_exit = unlink_on_exit
        self.keyspace.observers.append(self._publish)
        #: Called after every publication (under the KeySpace lock: keep it short).
        self.on_publish = on_publish
        #: Publications made, failed, and the wall time of the last one (seconds).
        self.publications = 0
        self.publish_failures = 0
        self.last_publish_seconds = 0.0
        #: Keys changed by watch updates, and values the decoder rejected (metrics).
        self.keys_changed = 0
        self.decode_failures = 0
        #: Called with the seconds each successful publication took (metrics.py).
        self.publish_hooks: list = []
        self.loaded = threading.Event()
        self._error: Optional[BaseException] = None
        self._unpublished = False  # the builder or store holds state not yet published
        self._failing = 0  # failed publications in a row
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: List[threading.Thread] = []
        self._hb: Optional[threading.Thread] = None
        self._pt: Optional[threading.Thread] = None  # the persist thread
        self._closed = False
        # -- fail static ----------------------------------------------------------
        self.mode, self.gid = mode, gid
        self.persist_interval = persist_interval
        #: Full loads from etcd made (the first load, compaction reloads, discarded files).
        self.full_loads = 0
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
        #: The snapshot this writer started from: the state file, or its predecessor's
        #: image still in shared memory (``path`` then names the segment); None: it
        #: loaded from etcd.
        self.restored: Optional[state.StateFile] = None
        self._from_shm = False  # restored is the predecessor's image, not the file
        # Keys the restored snapshot left out (decode failures): not known by key.
        self._excluded_base = 0
        self._resumed = False  # restored and rebuilt: the watch may resume from the file
        # (key, create, mod, version) of the file's most recently modified key:
        # etcd must show the same at the file's revision (see _history_differs).
        self._fingerprint: Optional[Tuple[bytes, int, int, int]] = None
        self._catchup: Optional[Tuple[int, int, int]] = None  # (etcd rev, count, max mod_revision)
        self._early: Any = None  # a watch opened ahead of the resume (KeySpace.open_watch)
        self._scanned: List[Any] = []  # [Top] of the restored image, once its entries passed
        # The probe thread (connect, probe, open the watch ahead): started by restore()
        # as soon as there is a file, so it overlaps the file's read and checks.
        self._prober: Optional[threading.Thread] = None
        self._probe_out: List[Tuple[int, int]] = []
        self._restore_done = threading.Event()
        self._connect_lock = threading.Lock()
        self._dirty = False  # published since the last state file capture
        self._capture: Optional[Tuple[Any, ...]] = None
        self._persist_cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._persisted: Tuple[int, int] = (0, 0)  # (cluster id, revision) of the last file written
        if self.state_dir:
            state.remove_temps(self.state_dir, self.name)  # we hold the writer lock now

    # -- decode + pack (the KeySpace's decoder) -----------------------------------
    def _decode(self, kv: KeyValue) -> bytes:
        # Packing here makes "not msgpack-serializable" a decode failure, and the
        # KeySpace keeps the packed entry (not the decoded value) in its store.
        try:
            return pack_entry(
                kv.key,
                self._user_decoder(kv),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
                kv.lease,
                self._verify,
            )
        except Exception:
            self.decode_failures += 1
            raise

    # -- state --------------------------------------------------------------------
    @property
    def error(self) -> Optional[BaseException]:
        """The error :meth:`run` stopped on, or None (still running, or stopped cleanly)."""
        return self._error

    @property
    def revision(self) -> int:
        """The revision the writer's state is exact at (KeySpace header)."""
        return self.keyspace.header.revision

    @property
    def key_count(self) -> int:
        with self.keyspace.lock:
            return len(self.keyspace.key_values)

    @property
    def max_image_bytes(self) -> int:
        """The largest image the writer publishes; a bigger one is a failed publication."""
        return self._max_image

    @max_image_bytes.setter
    def max_image_bytes(self, n: int) -> None:
        with self.keyspace.lock:
            self._max_image = n
            self.keyspace.key_values.builder.max_image = n

    @property
    def apply_delay(self) -> float:
        return self.keyspace.watch_apply_delay

    @apply_delay.setter
    def apply_delay(self, seconds: float) -> None:
        self.keyspace.watch_apply_delay = seconds

    # -- publishing (KeySpace observer: runs with keyspace.lock held) --------------
    def _publish(self) -> None:
        store: PackedStore = self.keyspace.key_values
        if self._closed:
            # stop() ran while a watch batch was in flight: publishing now would
            # recreate segments of a closed Publisher.
            store.pending = {}
            return
        changed = self.keyspace.changed_keys
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        self.changelog.record(self.keyspace.header.revision, changed)
        if changed is not None:
            self.keys_changed += len(changed)
        t_first = store.t_first or (c0, w0)
        store.t_first = None
        changes = store.take() if changed is not None else None
        self._try_publish(store, changes, changed is None, (c0, w0), t_first)

    def _try_publish(
        self, store: PackedStore, changes: Optional[Changes], full: bool, t0: tuple, t_first: tuple
    ) -> bool:
        ks = self.keyspace
        rev = ks.header.revision
        b = store.builder
        c0, w0 = t0
        try:
            if changes:
                b.apply_entries(changes, rev)
            else:
                b.revision = rev
        except ImageTooLargeError as exc:
            store.restore(changes or {})
            self._unpublished = True
            self._failed(rev, exc)
            return False
        self._unpublished = True
        if full:
            self.full_loads += 1
            self._catchup = None
            if self.restored is not None:
                log.warning(
                    "full load #%d of %r from etcd at revision %d replaces the state file's snapshot",
                    self.full_loads,
                    self.keyspace.root,
                    rev,
                )
            self.publisher.set_source(segment.SOURCE_ETCD)
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        try:
            parts, total = b.parts()
            c2, w2 = time.thread_time_ns(), time.perf_counter_ns()
            stamp = self._stamp(ks.header.cluster_id, rev)
            self.publisher.publish(
                parts,
                total,
                rev,
                len(b),
                stable=b.stable_span(),
                feed=self.changelog.region(),
                reuse=b.reuse(),
            )
        except (SegmentFullError, ImageTooLargeError) as exc:
            self._failed(rev, exc)
            return False
        except WriterLostError as exc:
            self._lose(exc)
            return False
        self._last_pub = stamp
        self._unpublished = False
        self._failing = 0
        if self._catchup is not None:
            self._check_caught_up()
        if self.state_dir:
            if not self._dirty:
                with self._persist_cond:
                    self._dirty = True
                    self._persist_cond.notify_all()
            if self._capture is None and time.monotonic() >= self._next_persist:
                self._take_capture(parts, total)
        c3, w3 = time.thread_time_ns(), time.perf_counter_ns()
        self.publications += 1
        self.last_publish_seconds = (w3 - w0) / 1e9
        for hook in self.publish_hooks:
            hook(self.last_publish_seconds)
        log.debug(
            "published %r revision %d: %d keys, %d bytes in %.2f ms",
            self.name,
            rev,
            len(b),
            total,
            (w3 - w0) / 1e6,
        )
        if self.on_publish is not None:
            stats = PublishStats(
                revision=rev,
                keys=len(b),
                image_bytes=total,
                changed_keys=None if full else (changes.keys() if changes else ()),
                t_published=w3,
                cpu_batch=c3 - t_first[0],
                wall_batch=w3 - t_first[1],
                cpu_apply=c1 - c0,
                cpu_parts=c2 - c1,
                cpu_publish=c3 - c2,
                wall_apply=w1 - w0,
                wall_parts=w2 - w1,
                wall_publish=w3 - w2,
                wall_total=w3 - w0,
                publications=self.publications,
                publish_failures=self.publish_failures,
            )
            try:
                self.on_publish(stats)
            except Exception:
                log.exception("on_publish hook of %r failed", self.name)
        return True

    def _stamp(self, cluster_id: int, rev: int) -> Tuple[int, int, int]:
        """Tell the publisher what the next publication is (cluster, identity, epoch); returns
        the (cluster, revision, epoch) it will carry.

        The epoch is raised when the revision would go below the last one
        published on this name, or the cluster changes: a full load after etcd's
        history was reset (recreated, or restored from a backup). That is the one
        case where readers see the revision decrease, and Health.epoch tells them.
        """
        last_cluster, last_rev, epoch = self._last_pub
        if last_cluster and (cluster_id != last_cluster or rev < last_rev or self._history_reset):
            # (a reset history can even reach the same revision with other keys)
            self._history_reset = False
            epoch += 1
            self.publisher.reset_etcd_revision(rev)
            self.keyspace.etcd_revision = rev
            log.warning(
                "%r: the published revision goes from %d (cluster %x) to %d (cluster %x): etcd's "
                "history differs from what was published; history epoch %d (Health.epoch)",
                self.name,
                last_rev,
                last_cluster,
                rev,
                cluster_id,
                epoch,
            )
        excluded = self.keyspace.excluded_count + self._excluded_base
        self.publisher.set_identity(cluster_id, self.identity, epoch, excluded)
        return cluster_id, rev, epoch

    def _lose(self, exc: WriterLostError) -> None:
        """The name is no longer this writer's: stop for good (run() raises ``exc``). Under keyspace.lock."""
        if self._fatal is None:
            self._fatal = exc
            log.error("%s", exc)
        self._stop.set()

    def _failed(self, rev: int, exc: BaseException) -> None:
        self.publish_failures += 1
        self._failing += 1
        # Retries run every heartbeat: log the 1st, 2nd, 4th, ... of a streak.
        log.log(
            logging.ERROR if self._failing & (self._failing - 1) == 0 else logging.DEBUG,
            "publication of %r at revision %d failed (%s); the last snapshot stays published, "
            "retrying at the next update",
            self.name,
            rev,
            exc,
        )

    def _retry_publish(self) -> None:
        """Publish the builder's state if the last publication failed (heartbeat thread)."""
        with self.keyspace.lock:
            if self._unpublished and not self._closed:
                store: PackedStore = self.keyspace.key_values
                t = (time.thread_time_ns(), time.perf_counter_ns())
                self._try_publish(store, store.take(), False, t, t)

    # -- fail static: state file -------------------------------------------------------
    _next_persist = 0.0

    def restore(self) -> bool:
        """Publish the state file, if there is a valid one; True if it was published.

        Call before :meth:`run` (``run``/``start`` call it themselves). Cost: the
        file is read straight into shared memory (Publisher.publish_from) and
        checked there: one read and one checksum pass (~0.35 s at 1M keys,
        new segment included); etcd is not contacted. A bad file is logged and
        ignored; readers never see it.
        """
        try:
            return self._restore()
        finally:
            self._restore_done.set()

    def _restore(self) -> bool:
        if not self.state_dir or self.restored is not None or self.loaded.is_set():
            return self.restored is not None
        t0 = time.monotonic()
        f, reason = state.quietly(
            state.open_file, self.state_dir, self.name, self.keyspace.root, self.decoder_name
        )
        prev = self._previous_to_continue(f.meta if f is not None else None)
        if prev is not None and self._take_over_previous(prev, t0):
            if f is not None:
                f.close()
            return True
        if f is None:
            if reason == "no state file":
                log.info("no state file for %r in %s: loading from etcd", self.name, self.state_dir)
            return False
        sf = f.meta
        # Reach etcd meanwhile: the read and checks below mostly run without the GIL.
        self._start_probe()
        from .builder import scan_image

        scanned: List[Any] = []

        def fill(view: memoryview, off: int) -> None:
            # Into the new, still invisible buffer: the file's bytes and checksum,
            # the image's structure, then every entry (what a resume relies on),
            # so a file that fails any of them never reaches a reader.
            iv = f.read_image(view, off)
            try:
                scanned.append(scan_image(iv, self.keyspace.root_key))
            except CorruptSegmentError as exc:
                raise StateFileError(f"{sf.path}: {exc}") from None
            finally:
                iv.release()

        # Source first: readers must never see the disk copy labelled "etcd".
        source = self.publisher.source
        self.publisher.set_source(segment.SOURCE_DISK)
        self._stamp(sf.cluster_id, sf.revision)
        try:
            with f, self.keyspace.lock:
                # A restored snapshot is a load: its change set is "everything".
                self.changelog.record(sf.revision, None)
                self.publisher.publish_from(
                    f.image_len, fill, sf.revision, sf.count, feed=self.changelog.region()
                )
        except (StateFileError, OSError) as exc:
            self.publisher.set_source(source)
            log.warning("state file ignored: %s; loading from etcd instead", exc)
            return False
        except SegmentFullError as exc:
            self.publisher.set_source(source)
            self.publish_failures += 1
            log.error("publication of the state file of %r failed: %s", self.name, exc)
            return False
        self.publisher.heartbeat(sf.revision)
        self.restored = sf
        self._excluded_base = sf.excluded
        self._last_pub = (sf.cluster_id, sf.revision, self.publisher.epoch)
        self._scanned = scanned  # adopt() need not check the entries again
        self._persisted = (sf.cluster_id, sf.revision)  # nothing to write until something changes
        # The file is fresh: the next write waits an interval instead of competing
        # with the catch-up for CPU (a 150 MB write at 1M keys).
        self._next_persist = time.monotonic() + self.persist_interval
        self.publications += 1
        log.warning(
            "published %r from the state file %s before contacting etcd: %d keys at revision %d, "
            "written %.0f s ago (readers see source 'disk' until the writer catches up with etcd) in %.2f s",
            self.name,
            sf.path,
            sf.count,
            sf.revision,
            max(0.0, time.time() - sf.written_at),
            time.monotonic() - t0,
        )
        return True

    def _previous_to_continue(self, meta: Optional[state.StateFile]) -> Optional[segment.Published]:
        """The predecessor's publication to take over instead of the state file, if any.

        Readers already have it, so taking it over publishes nothing, and a
        state file behind it (written up to ``persist_interval`` before a crash)
        is never published over it: the revision readers see does not go back
        across a restart (issue 25). Only an image of this identity (prefix and
        decoder) with a cluster id, and ahead of a file of the same cluster.
        """
        prev = self.publisher.previous
        if prev is None or prev.identity != self.identity or not prev.cluster_id:
            return None
        if meta is not None and meta.cluster_id == prev.cluster_id and meta.revision >= prev.revision:
            # The file is as new (the same snapshot: publishing it changes nothing
            # readers can see, and its checks run as usual) or newer.
            return None
        return prev

    def _take_over_previous(self, prev: segment.Published, t0: float) -> bool:
        """Continue from the predecessor's image in shared memory; False (logged) if unusable.

        Its entries are checked like a state file's (scan_image, O(n) in C without
        the GIL); the takeover itself happens in :meth:`_rebuild`. Source "disk"
        (not yet caught up) until the resume catches up, as after a state file.
        """
        from .builder import scan_image

        self._start_probe()
        try:
            dv = self.publisher.open_previous()
        except (SegmentNotFoundError, CorruptSegmentError, UntrustedSegmentError, OSError) as exc:
            log.warning("the previous writer's image of %r cannot be taken over (%s)", self.name, exc)
            return False
        try:
            view = ImageView(dv.buf, prev.offset, prev.length)
            try:
                if view.revision != prev.revision or view.count != prev.key_count:
                    raise CorruptSegmentError("its record disagrees with its image header")
                top = scan_image(view, self.keyspace.root_key)
            finally:
                view.release()
        except CorruptSegmentError as exc:
            log.warning("the previous writer's image of %r cannot be taken over (%s)", self.name, exc)
            return False
        finally:
            dv.close()
        self.publisher.set_source(segment.SOURCE_DISK)
        self.publisher.heartbeat(prev.revision)
        path = segment.shm_path(segment.data_name(self.name, prev.gen))
        self.restored = state.StateFile(
            path,
            self.name,
            self.keyspace.root,
            self.decoder_name,
            prev.cluster_id,
            prev.revision,
            prev.key_count,
            prev.publish_ns / 1e9,
            b"",
            prev.excluded,
        )
        self._from_shm = True
        self._excluded_base = prev.excluded
        self._scanned = [top]
        # A load at this revision as far as the change feed can tell: readers asking
        # for changes from before it get ChangesTooOldError, not a gap.
        self.changelog.record(prev.revision, None)
        # The file on disk (if any) is behind what readers have: write it an
        # interval from now, when the catch-up is over.
        self._dirty = True
        self._next_persist = time.monotonic() + self.persist_interval
        log.warning(
            "took over %r from the previous writer's shared memory (%s): %d keys at revision %d, "
            "no older state file published over it (readers see source 'disk' until caught up) in %.2f s",
            self.name,
            path,
            prev.key_count,
            prev.revision,
            time.monotonic() - t0,
        )
        return True

    def _rebuild(self) -> bool:
        """Take over the restored image as the writer's store; False (logged) if it is unusable.

        :meth:`ImageBuilder.adopt` copies the arena and order as they are,
        checks every entry and rebuilds the hash table (O(n), 0.3-0.5 s at 1M
        keys with the compiled kernels, ~6 s without). Nothing is published: readers already have this very
        snapshot (the restore published it), and the first watch update
        publishes the builder's own image, rebuilt table included.
        """
        from .builder import ImageBuilder

        sf = self.restored
        assert sf is not None
        t0 = time.monotonic()
        # Read back from shared memory: the restore read the file straight there
        # (or the predecessor left it there). Nothing publishes before the watch
        # starts, so the image holds still.
        dv = None
        mv = None
        try:
            if self._from_shm:
                prev = self.publisher.previous
                assert prev is not None
                dv = self.publisher.open_previous()
                mv, off, length = dv.buf, prev.offset, prev.length
            else:
                mv, off, length = self.publisher.published()
            view = ImageView(mv, off, length)
            try:
                b, top = ImageBuilder.adopt(
                    view, self.keyspace.root_key, max_image=self._max_image, scanned=self._scanned
                )
            finally:
                view.release()
        except (CorruptSegmentError, ImageTooLargeError, SegmentNotFoundError, UntrustedSegmentError) as exc:
            log.error("snapshot %s ignored: %s; loading from etcd instead", sf.path, exc)
            if not self._from_shm:
                state.discard(self.state_dir or "", self.name)
                self._persisted = (0, 0)
            return False
        finally:
            if dv is not None:
                dv.close()
            elif mv is not None:
                mv.release()
        with self.keyspace.lock:
            self.keyspace.restore(Header(cluster_id=sf.cluster_id, revision=sf.revision), PackedStore(b))
        self._fingerprint = top
        log.info(
            "took over %d keys of %r from the state file in %.2f s (%s kernels)",
            len(b),
            self.name,
            time.monotonic() - t0,
            b.impl,
        )
        return True

    def _probe(self, client: Any) -> Tuple[int, int]:
        """(cluster id, current revision P): one single-key Range (its response header).

        ~1 ms. The key count and greatest mod_revision at P are asked for
        later, off the critical path (:meth:`_find_top`): even a count-only
        Range walks etcd's index (0.29 s at 1M keys, measured).
        """
        resp = client.get_response(self.keyspace.root_key)
        return int(resp.header.cluster_id), int(resp.header.revision)

    def _find_top(self, rev: int) -> None:
        """Ask etcd for the key count and greatest mod_revision under root at ``rev``; re-check the catch-up.

        A count-only Range and a Range sorted by mod_revision (limit 1, keys
        only), both at ``rev``: etcd walks the whole prefix for each (0.3 s and
        2.6 s at 1M keys, measured), so they run on a thread of their own after
        the watch has resumed, retried at most 5 times, 10 s apart. Without
        them the source still turns "etcd" once the mirror reaches ``rev``.
        """
        root = self.keyspace.root_key
        end = prefix_end(root) or b"\0"
        for _attempt in range(5):
            if self._stop.is_set() or self._catchup is None:
                return
            try:
                c = self.connect()
                count = int(c.get_range_response(root, end, count_only=True, revision=rev).count)
                resp = c.get_range_response(
                    root, end, limit=1, sort_order="descend", sort_target="mod", keys_only=True, revision=rev
                )
            except Exception as exc:
                log.debug(
                    "key count and greatest mod_revision under %r not known yet (%s)", self.keyspace.root, exc
                )
                if self._stop.wait(10.0):
                    return
                continue
            top = int(resp.kvs[0].mod_revision) if resp.kvs else 0
            with self.keyspace.lock:
                if self._catchup is not None and self._catchup[0] == rev:
                    self._catchup = (rev, count, top)
                    self._check_caught_up()
            return

    def _await_etcd(self, out: List[Tuple[int, int]]) -> None:
        """Connect and probe etcd, with backoff, until it answers or :meth:`stop`.

        Runs on a thread of its own while :meth:`_rebuild` works, so a resume
        pays max(rebuild, connect + probe), not their sum. Appends the probe
        (see :meth:`_probe`) to ``out``.
        """
        backoff = 0.05
        quiet_until = 0.0
        while not self._stop.is_set():
            if self._restore_done.is_set() and self.restored is None:
                return  # the file was refused: the full load reaches etcd itself
            try:
                client = self.connect()
                cluster, rev = self._probe(client)
                self._open_early(client, cluster, rev)
                out.append((cluster, rev))
                return
            except Exception as exc:
                if self._stop.is_set():
                    return
                # Once, then every 30 s: an outage must not flood the log.
                now = time.monotonic()
                level = logging.WARNING if now >= quiet_until else logging.DEBUG
                if level == logging.WARNING:
                    quiet_until = now + 30.0
                log.log(
                    level,
                    "etcd not reachable for %r (%s: %s); serving the state file's snapshot, retrying",
                    self.name,
                    type(exc).__name__,
                    exc,
                )
                if self._stop.wait(backoff):
                    return
                backoff = min(5.0, backoff * 2)

    def _open_early(self, client: Any, cluster: int, rev: int) -> None:
        """Open the resumed watch now, speculatively, if etcd looks like the file's (probe thread).

        etcd then gathers the missed events (from its backend, for a watcher
        behind) and sends them while the takeover runs; they queue in the
        stream until the watch applies them (KeySpace.open_watch). Closed
        unused if the resume is refused after all (_resume_or_load).
        """
        self._restore_done.wait()
        sf = self.restored
        if sf is None or cluster != sf.cluster_id or rev < sf.revision:
            return
        try:
            early = self.keyspace.open_watch(client, sf.revision + 1, self.stale_after, self.watch_silence)
        except Exception as exc:  # compacted, or etcd went away: the watch proper finds out
            log.debug("no early watch of %r from revision %d: %s", self.name, sf.revision + 1, exc)
            return
        with self.keyspace.lock:
            if self._stop.is_set():
                early.close()
            else:
                self._early = early

    def _resume(self) -> None:
        """Restored: take the image over while other threads reach etcd, then resume or load.

        One thread connects, probes and opens the watch ahead (:meth:`_await_etcd`),
        another prepares the next buffer; the disk copy stays published meanwhile.
        """
        t = self._start_probe()
        # The first catch-up publication writes the other buffer: reserve it now.
        threading.Thread(target=self._reserve_spare, daemon=True, name="shmkeyspace-reserve").start()
        self._resumed = self._resumed or self._rebuild()
        while t.is_alive():
            t.join(0.5)
        if self._probe_out:
            self._resume_or_load(*self._probe_out[0])

    def _start_probe(self) -> threading.Thread:
        """The probe thread (:meth:`_await_etcd`), started on the first call."""
        if self._prober is None:
            self._prober = threading.Thread(
                target=self._await_etcd, args=(self._probe_out,), daemon=True, name="shmkeyspace-probe"
            )
            self._threads.append(self._prober)
            self._prober.start()
        return self._prober

    def _reserve_spare(self) -> None:
        with self.keyspace.lock:  # publications run under it too
            if self._closed:
                return
            try:
                self.publisher.reserve_spare()
            except SegmentFullError as exc:
                log.debug(
                    "cannot reserve the next buffer of %r yet (%s): the publication will", self.name, exc
                )

    def _close_early(self) -> None:
        with self.keyspace.lock:
            early, self._early = self._early, None
        if early is not None:
            early.close()

    def _resume_or_load(self, cluster: int, rev: int) -> None:
        """Decide between resuming from the state file and a full load, etcd having answered."""
        sf = self.restored
        assert sf is not None
        differs = ""
        t_check = time.monotonic()
        if cluster == sf.cluster_id and rev >= sf.revision and self._resumed:
            while True:
                try:
                    t_check = time.monotonic()
                    differs = self._history_differs(self.connect())
                    break
                except Exception as exc:
                    log.warning("checking %r's history against etcd failed (%s); retrying", self.name, exc)
                    if self._stop.wait(1.0):
                        return
        self.keyspace.etcd_revision = max(self.keyspace.etcd_revision, rev)
        why = ""
        if cluster != sf.cluster_id:
            why = f"it is of etcd cluster {sf.cluster_id:x}, etcd answers as cluster {cluster:x}"
        elif rev < sf.revision:
            why = f"etcd is at revision {rev}, behind the file's {sf.revision} (a new or restored etcd?)"
        elif differs:
            why = differs
        elif not self._resumed:
            why = "its entries could not be used"
        if why:
            self._close_early()
            self._history_reset = cluster != sf.cluster_id or rev < sf.revision or bool(differs)
            if self._resumed:
                log.warning("state file %s discarded: %s; full load from etcd", sf.path, why)
                state.discard(self.state_dir or "", self.name)
            self._persisted = (0, 0)  # the next file may have a lower revision (another history)
            self.load()
            return
        check_s = time.monotonic() - t_check
        with self.keyspace.lock:
            self._catchup = (rev, -1, -1)  # -1: the key count and greatest mod_revision are not known yet
            self._check_caught_up()
        if self._catchup is not None:
            t = threading.Thread(target=self._find_top, args=(rev,), daemon=True, name="shmkeyspace-top")
            t.start()
        log.info(
            "resuming %r from the %s's revision %d (etcd at %d; history checked in %.3f s): no full load",
            self.keyspace.root,
            "previous writer's image" if self._from_shm else "state file",
            sf.revision,
            rev,
            check_s,
        )
        self.loaded.set()

    #: Keys of the restored snapshot read back from etcd, with values, by the
    #: history check (evenly spaced in key order, plus the most recently modified).
    HISTORY_SAMPLE = 32

    def _history_differs(self, client: Any) -> str:
        """Why etcd's history disagrees with the restored snapshot at its revision R ("" if it agrees).

        A cluster id is not proof of identity: a cluster recreated from an empty
        data dir under the same flags gets the same id (measured), and reaches R
        with other keys. So, all at revision R:

        * the most recently modified key must have the same create/mod revision
          and version (one point read);
        * the key count under the prefix must be the snapshot's, plus at most the
          keys it left out (decode failures) — a count-only Range, which walks
          etcd's index: ~0.3 s at 1M keys, measured;
        * :attr:`HISTORY_SAMPLE` keys evenly spaced in key order must each be
          there with the same revisions, lease and value (decoded and packed
          again, compared byte for byte): point reads, ~1 ms each.

        Any difference, or a decode that fails now, means a full load. What this
        cannot see: a cluster recreated with the same number of keys, under the
        same revisions, that differs only in keys the sample missed. Compacted
        past R: "" (the watch will then find the compaction and reload).
        """
        fp, sf = self._fingerprint, self.restored
        if fp is None or sf is None:
            return ""
        rev = sf.revision
        root = self.keyspace.root_key
        try:
            key, c, m, v = fp
            resp = client.get_response(key, revision=rev)
            kvs = list(resp.kvs)
            got = (
                (int(kvs[0].create_revision), int(kvs[0].mod_revision), int(kvs[0].version)) if kvs else None
            )
            if got != (c, m, v):
                return (
                    f"etcd's history differs from the snapshot's: key {key!r} at revision {rev} is "
                    f"{'absent' if got is None else 'create/mod/version %d/%d/%d' % got} in etcd, "
                    f"{c}/{m}/{v} in the snapshot (a new cluster with the same id?)"
                )
            n = int(
                client.get_range_response(
                    root, prefix_end(root) or b"\0", count_only=True, revision=rev
                ).count
            )
            slack = sf.excluded if sf.excluded < state.MAX_EXCLUDED else n
            if not sf.count <= n <= sf.count + slack:
                return (
                    f"etcd's history differs from the snapshot's: etcd has {n} keys under {self.keyspace.root!r} "
                    f"at revision {rev}, the snapshot {sf.count}"
                    + (f" (and {sf.excluded} left out)" if sf.excluded else "")
                )
            b = self._builder()
            for k in b.sample_keys(self.HISTORY_SAMPLE):
                why = self._sample_differs(client, b, k, rev)
                if why:
                    return f"etcd's history differs from the snapshot's: key {k!r} at revision {rev} {why}"
        except Exception as exc:
            if "compacted" in str(exc).lower() or "compacted" in _details(exc).lower():
                return ""
            raise
        return ""

    def _sample_differs(self, client: Any, b: ImageBuilder, key: bytes, rev: int) -> str:
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
            packed = self._decode(kv)
        except Exception as exc:
            self.decode_failures -= 1  # a probe, not a value the mirror rejected
            return f"does not decode now ({type(exc).__name__})"
        if packed != b.packed(key):
            return (
                f"has another value or revisions in etcd (create/mod/version {kv.create_revision}/"
                f"{kv.mod_revision}/{kv.version})"
            )
        return ""

    def _check_caught_up(self) -> None:
        """Flip the source to "etcd" once the mirror equals etcd at the probed revision.

        Exact (runs under keyspace.lock): with every event up to the probe's
        revision P applied the mirror is etcd at P. Before that, once the newest
        put of any key present at P (``top``, when known: see :meth:`_find_top`)
        is applied, the mirror holds every key present at P with its value at
        P, plus keys whose deletion is still to come, so equal key counts mean
        nothing is left to apply.
        """
        assert self._catchup is not None
        rev, count, top = self._catchup
        ks = self.keyspace
        mine = len(ks.key_values) + ks.excluded_count
        if ks.header.revision >= rev or (top >= 0 and ks.header.revision >= top and mine == count):
            self._catchup = None
            self.publisher.set_source(segment.SOURCE_ETCD)
            log.info(
                "%r caught up with etcd at revision %d after resuming from the state file (no full load)",
                self.name,
                ks.header.revision,
            )

    @property
    def source(self) -> str:
        """ "disk" while serving the state file's data not yet caught up, else "etcd" (or "unknown")."""
        return segment.SOURCE_NAMES.get(self.publisher.source, "unknown")

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
        with self._persist_cond:
            excluded = self.keyspace.excluded_count + self._excluded_base
            self._capture = (frozen, total, hdr.cluster_id, hdr.revision, len(self._builder()), excluded)
            self._dirty = False
            self._next_persist = time.monotonic() + self.persist_interval
            self._persist_cond.notify_all()
        self.capture_cpu_seconds += time.thread_time() - c0

    def _persist_loop(self) -> None:
        while True:
            with self._persist_cond:
                while self._capture is None and not self._stop.is_set():
                    if self._dirty and time.monotonic() >= self._next_persist:
                        break  # changes published, none captured since: capture ourselves
                    # Notified on the first change after a write, on a capture and on stop.
                    wait = self._next_persist - time.monotonic() if self._dirty else self.persist_interval
                    self._persist_cond.wait(max(0.01, wait))
                cap, self._capture = self._capture, None
            if cap is None:
                if self._stop.is_set():
                    return
                with self.keyspace.lock:
                    if self._closed or not self.keyspace.header.cluster_id:
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
            if self._closed or not hdr.cluster_id or (hdr.cluster_id, hdr.revision) == self._persisted:
                cap = None
            else:
                parts, total = self._builder().parts()
                self._take_capture(parts, total)
                with self._persist_cond:
                    cap, self._capture = self._capture, None
        if cap is not None:
            self._write_state(cap)  # after the write in flight, if any (_write_lock)
        else:
            with self._write_lock:
                pass

    def _builder(self) -> ImageBuilder:
        return self.keyspace.key_values.builder

    # -- running --------------------------------------------------------------------
    def connect(self) -> Any:
        with self._connect_lock:  # the probe thread and the main thread may both ask first
            return self._connect()

    def _connect(self) -> Any:
        if self._client is None:
            from .etcd import Failover

            # Half of stale_after per member probed: a healthy member answers in
            # milliseconds, a hung one must not hold the failover up for long.
            probe_timeout = min(self._connect_args.get("timeout") or 10.0, max(1.0, self.stale_after / 2))
            # The probe reads the prefix's own key: a user limited to the prefix may read it.
            self._failover = Failover(
                self._endpoints or "",
                probe_timeout=probe_timeout,
                probe_key=self.keyspace.root_key,
                **self._connect_args,
            )
            self._client = self._failover.connect()
        return self._client

    def _reconnect(self) -> Any:
        """The watch lost its member: move on to the next endpoint that answers."""
        self._client = self._failover.next()
        log.info("etcd: %r now follows %s", self.name, self._failover.endpoint)
        return self._client

    @property
    def endpoint(self) -> Optional[str]:
        """The etcd endpoint the writer uses now (None with a client passed in)."""
        return self._failover.endpoint if self._failover is not None else None

    def load(self) -> None:
        """Connect if needed and load the prefix, publishing it (progress logged for big ones)."""
        client = self.connect()
        self._start_heartbeat()
        t0 = time.monotonic()
        last = [t0]

        def progress(n: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                log.info("loading %r: %d keys so far", self.keyspace.root, n)

        self.keyspace.load(client, progress=progress)
        self._catchup = None
        self.keyspace.note_contact()
        log.info(
            "loaded %r at revision %d: %d keys in %.2fs; published as %r",
            self.keyspace.root,
            self.keyspace.header.revision,
            self.key_count,
            time.monotonic() - t0,
            self.name,
        )
        self.loaded.set()

    def run(self) -> None:
        """Load (or resume from the state file), then watch until :meth:`stop`. Blocks.

        Raises the error that stopped the writer (also kept in :attr:`error`);
        returns normally after :meth:`stop`.
        """
        try:
            self._start_heartbeat()
            if self.state_dir and self._pt is None:
                self._pt = threading.Thread(
                    target=self._persist_loop, daemon=True, name="shmkeyspace-persist"
                )
                self._threads.append(self._pt)
                self._pt.start()
            if not self.loaded.is_set():
                if self.restore():
                    self._resume()
                else:
                    self.load()
            if not self._stop.is_set():
                with self.keyspace.lock:
                    early, self._early = self._early, None
                self.keyspace.watch(
                    self.connect(),
                    self._stop,
                    stale_after=self.stale_after,
                    reconnect=self._reconnect if self._failover is not None else None,
                    first=early,
                    watch_silence=self.watch_silence,
                )
            if self._fatal is not None:
                raise self._fatal
        except BaseException as raised:
            exc = raised
            if self._fatal is not None:
                exc = self._fatal  # whatever the stop it caused made the watch raise
            elif self._stop.is_set():
                log.debug("writer %r: error after stop ignored", self.name, exc_info=True)
                return
            self._error = exc
            log.error("writer %r stopped on an unrecoverable error: %s", self.name, exc)
            raise exc
        finally:
            self._stop.set()
            self._done.set()

    def start(self) -> "Writer":
        """Publish, then run the watch on a thread; returns once the first snapshot is published.

        That is the state file's snapshot when there is a valid one (published
        before etcd is contacted), else the first full load, made here.
        """
        if not self.loaded.is_set() and not self.restore():
            self.load()
        t = threading.Thread(target=self._run_quietly, daemon=True, name="shmkeyspace-writer")
        self._threads.append(t)
        t.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`run` has ended (error or stop); False on timeout."""
        return self._done.wait(timeout)

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException:
            pass  # kept in self.error and logged by run()

    def _start_heartbeat(self) -> None:
        if self._hb is None and not self._closed:
            self._hb = threading.Thread(target=self._heartbeat, daemon=True, name="shmkeyspace-heartbeat")
            self._threads.append(self._hb)
            self._hb.start()

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            if self.publisher.ctrl is None:
                return
            reason = self.publisher.lost()
            if reason:
                with self.keyspace.lock:
                    if not self._closed:
                        try:
                            self.publisher.check_owner()  # retires the block, raises WriterLostError
                        except WriterLostError as exc:
                            self._lose(exc)
                return
            ks = self.keyspace
            self.publisher.heartbeat(max(ks.etcd_revision, ks.header.revision))
            if self._unpublished:
                self._retry_publish()
            self._stop.wait(self.heartbeat_interval)

    def stop(self) -> None:
        """Stop watching, write the state file if it is behind, release the writer lock
        (and unlink if asked). Idempotent."""
        self._stop.set()
        self._close_early()
        with self._persist_cond:
            self._persist_cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)
        if self._closed:
            return
        try:
            if self._fatal is None:  # a writer that lost its name may share the state dir with its successor
                self.persist_now()  # the last publication survives a clean exit
        except Exception:
            log.exception("final write of the state file of %r failed", self.name)
        with self.keyspace.lock:
            self._closed = True
            self.publisher.close(unlink=self.unlink_on_exit)
        if self._failover is not None:
            self._failover.close()
        elif self._own_client and self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass

    close = stop

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _callable_name(decoder: Optional[Callable[..., Any]]) -> str:
    """A stable name for ``decoder`` ("raw" for none), recorded in state files."""
    if decoder is None:
        return "raw"
    mod = getattr(decoder, "__module__", None) or "?"
    qual = getattr(decoder, "__qualname__", None) or type(decoder).__qualname__
    return f"{mod}:{qual}"


def _details(exc: BaseException) -> str:
    d = getattr(exc, "details", None)
    try:
        return str(d()) if callable(d) else ""
    except Exception:
        return ""
