"""Publishing: every KeySpace update of a writer becomes one publication.

Owns :class:`UpdatePublisher`, the writer's KeySpace observer, and
:class:`PublishStats`, what each publication did. It promises:

* every KeySpace update becomes one publication, made as an observer (under the
  KeySpace lock); the changed keys of each are in :attr:`PublishStats.changed_keys`;
* each publication carries the change feed (``feed.py``) and what its image is a
  mirror of (cluster id, identity, history epoch, keys left out);
* revisions never go back within an epoch: the epoch is raised when the
  revision would go below the last one published on this name, or the cluster
  or its history changes (:meth:`UpdatePublisher.stamp`);
* a failed publication (a full /dev/shm, the image size limit) is logged and
  counted; the changes stay pending in the store, the last snapshot stays
  published, and the publication is retried at the next update or heartbeat
  (:meth:`UpdatePublisher.retry`): the writer never dies of it, and what it
  publishes is always a whole state;
* after each publication the observers (:meth:`UpdatePublisher.add_observer`)
  receive its :class:`PublishStats`, in the order they were added; one that
  raises is logged and the others still run;
* a publication after the writer closed is dropped, never made (it would
  recreate the segments of a closed Publisher).

Locking: everything here runs with ``keyspace.lock`` held (the observer is
called under it; :meth:`UpdatePublisher.retry` takes it), which guards the
publication state (``last_pub``, ``history_reset``, ``excluded_base``,
``unpublished``, ``closed``) and orders publications; the one exception is the
resume's restore (:meth:`UpdatePublisher.restored`), which runs before the
watch starts, so before any update. The counters are written under it and may
be read without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, List, Optional, Tuple

from . import publisher, segment
from .errors import ImageTooLargeError, SegmentFullError, WriterLostError
from .feed import ChangeLog
from .keyspace import KeySpace
from .store import PackedStore

if TYPE_CHECKING:
    from .accounting import PrefixBytes
    from .builder import Changes
    from .persist import Persister
    from .resume import Resumer

log = logging.getLogger(__name__)


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


#: A publish observer: called with the PublishStats of each publication.
PublishObserver = Callable[[PublishStats], None]


class UpdatePublisher:
    """The KeySpace observer of writer ``name``: publishes each update through ``publisher``.

    ``last`` is (cluster id, revision, epoch) of the last publication on this
    name (this writer's predecessor's, at first). ``on_lost`` is called when the
    name is no longer this writer's (WriterLostError), under ``keyspace.lock``.
    The persister and the resume are attached once built (:meth:`attach`): a
    publication wakes the persist thread and may end a resume's catch-up.
    """

    def __init__(
        self,
        name: str,
        keyspace: KeySpace,
        publisher: publisher.Publisher,
        changelog: ChangeLog,
        identity: int,
        last: Tuple[int, int, int],
        on_lost: Callable[[WriterLostError], None],
    ) -> None:
        self.name = name
        self.keyspace = keyspace
        self.publisher = publisher
        self.changelog = changelog
        self.identity = identity
        #: (cluster id, revision, epoch) of the last publication on this name, this
        #: writer's or its predecessor's: the floor revisions must not go below
        #: without raising the epoch (see stamp).
        self.last_pub = last
        #: Set by the resume when it found etcd's history other than the snapshot's:
        #: the full load that follows starts a new epoch whatever its revision.
        self.history_reset = False
        #: Keys the restored snapshot left out (decode failures): not known by key.
        self.excluded_base = 0
        #: The store holds state not yet published (a publication failed): retry it.
        self.unpublished = False
        #: Set (under keyspace.lock) when the writer closed its Publisher.
        self.closed = False
        self._failing = 0  # failed publications in a row
        self._etcd_pending = False  # a full load awaits publication: then source "etcd"
        self._on_lost = on_lost
        self._observers: List[PublishObserver] = []
        self._persister: Optional[Persister] = None
        self._resumer: Optional[Resumer] = None
        #: Publications made, failed, and the wall time of the last one (seconds).
        self.publications = 0
        self.publish_failures = 0
        self.last_publish_seconds = 0.0
        #: Keys changed by watch updates (metrics).
        self.keys_changed = 0
        #: Full loads from etcd made (the first load, compaction reloads, discarded files).
        self.full_loads = 0
        #: Keys and bytes per prefix (accounting.py), or None (the default: off).
        self.accounting: Optional[PrefixBytes] = None

    def attach(self, persister: Persister, resumer: Resumer) -> None:
        """Wire in the persister and the resume (the Writer does, once it built them)."""
        self._persister = persister
        self._resumer = resumer

    def add_observer(self, fn: PublishObserver) -> None:
        """Call ``fn(stats)`` after every publication, after the observers added before it.

        It runs on the publishing thread under the KeySpace lock: keep it short.
        One that raises is logged; the writer and the other observers go on.
        """
        self._observers.append(fn)

    @property
    def excluded_count(self) -> int:
        """Keys the published image leaves out: decode failures, the restored snapshot's included."""
        return self.keyspace.excluded_count + self.excluded_base

    def restored(self, cluster_id: int, revision: int, excluded: int) -> None:
        """The resume published a state file itself (Publisher.publish_from): count it, continue from it.

        Called before the watch starts, so before any update can be published.
        """
        self.excluded_base = excluded
        self.last_pub = (cluster_id, revision, self.publisher.epoch)
        self.publications += 1

    def restore_failed(self) -> None:
        """The resume's publication of a state file failed (counted as a failed publication)."""
        self.publish_failures += 1

    def close(self, unlink: bool) -> None:
        """Close the Publisher (under keyspace.lock); later updates publish nothing."""
        self.closed = True
        self.publisher.close(unlink=unlink)

    # -- publishing (KeySpace observer: runs with keyspace.lock held) --------------
    def __call__(self) -> None:
        store: PackedStore = self.keyspace.key_values
        if self.closed:
            # stop() ran while a watch batch was in flight: publishing now would
            # recreate segments of a closed Publisher.
            store.discard()
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
        acc = self.accounting
        sizes = acc.before(b, changes or ()) if acc is not None else None
        try:
            if changes:
                b.apply_entries(changes, rev)
            else:
                b.revision = rev
        except ImageTooLargeError as exc:
            store.restore(changes or {})
            self.unpublished = True
            self._failed(rev, exc)
            return False
        if acc is not None:
            acc.after(b, sizes)
        self.unpublished = True
        if full:
            self.full_loads += 1
            if self._resumer is not None:
                self._resumer.full_load(rev, self.full_loads)
            # "etcd" once this image is the published one (also when a retry
            # publishes it): before, readers could see the disk copy labelled "etcd".
            self._etcd_pending = True
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        try:
            parts, total = b.parts()
            c2, w2 = time.thread_time_ns(), time.perf_counter_ns()
            stamp = self.stamp(ks.header.cluster_id, rev)
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
            self._on_lost(exc)
            return False
        self.last_pub = stamp
        if self._etcd_pending:
            self.publisher.set_source(segment.SOURCE_ETCD)
            self._etcd_pending = False
        self.unpublished = False
        self._failing = 0
        if self._resumer is not None:
            self._resumer.published()
        if self._persister is not None:
            self._persister.published(parts, total)
        c3, w3 = time.thread_time_ns(), time.perf_counter_ns()
        self.publications += 1
        self.last_publish_seconds = (w3 - w0) / 1e9
        log.debug(
            "published %r revision %d: %d keys, %d bytes in %.2f ms",
            self.name,
            rev,
            len(b),
            total,
            (w3 - w0) / 1e6,
        )
        if self._observers:
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
            for fn in self._observers:
                try:
                    fn(stats)
                except Exception:
                    log.exception("on_publish hook of %r failed", self.name)
        return True

    def stamp(self, cluster_id: int, rev: int) -> Tuple[int, int, int]:
        """Tell the publisher what the next publication is (cluster, identity, epoch); returns
        the (cluster, revision, epoch) it will carry.

        The epoch is raised when the revision would go below the last one
        published on this name, or the cluster changes: a full load after etcd's
        history was reset (recreated, or restored from a backup). That is the one
        case where readers see the revision decrease, and Health.epoch tells them.
        """
        last_cluster, last_rev, epoch = self.last_pub
        if last_cluster and (cluster_id != last_cluster or rev < last_rev or self.history_reset):
            # (a reset history can even reach the same revision with other keys)
            self.history_reset = False
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
        excluded = self.excluded_count
        self.publisher.set_identity(cluster_id, self.identity, epoch, excluded)
        return cluster_id, rev, epoch

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

    def retry(self) -> None:
        """Publish the builder's state if the last publication failed (heartbeat thread)."""
        with self.keyspace.lock:
            if self.unpublished and not self.closed:
                store: PackedStore = self.keyspace.key_values
                t = (time.thread_time_ns(), time.perf_counter_ns())
                self._try_publish(store, store.take(), False, t, t)
