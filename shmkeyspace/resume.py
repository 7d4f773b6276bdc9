"""Fail static on start: restore the last snapshot at once, then resume the watch from it.

Owns :class:`Resumer`: what a starting writer serves before etcd answers (the
state file, or its predecessor's image still in shared memory), the takeover of
that image as the writer's store, the history check against etcd, and the
catch-up that turns the source from "disk" to "etcd". It promises:

* a valid state file is published at once, before etcd is asked anything, with
  the control block's source word set to "disk": read into a new segment no
  reader can see yet and checked there, every entry included (a bad file never
  reaches readers), while another thread connects;
* revisions never go back across a restart: the predecessor's image still in
  shared memory is taken over instead of a state file behind it (nothing is
  published: readers already have it);
* the writer then takes that image over as its own state (ImageBuilder.adopt);
  once etcd answers with the same cluster id, a revision not behind the
  snapshot's and the same history (``history.py``), the watch
  resumes from the snapshot's revision + 1 and the source becomes "etcd" when
  the mirror has caught up;
* a full load happens only when etcd compacted past the snapshot's revision, or
  the cluster or its history differ (the file is discarded, with the reason
  logged; the load that follows starts a new history epoch).

Locking: the restore runs on the starting thread before the watch, and
``restore_done`` is set once ``restored`` is final; the probe thread reads
``restored`` only after that. ``_catchup`` and ``_early`` are guarded by
``keyspace.lock`` (the catch-up check runs after publications, which hold it);
``_probe_out`` is appended by the probe thread and read once it has ended.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from . import history, publisher, segment, state
from .errors import (
    CorruptSegmentError,
    ImageTooLargeError,
    SegmentFullError,
    SegmentNotFoundError,
    StateFileError,
    UntrustedSegmentError,
)
from .feed import ChangeLog
from .key_values import KeyValue, prefix_end
from .keyspace import Header, KeySpace
from .snapshot import ImageView
from .store import PackedStore

if TYPE_CHECKING:
    from .builder import ImageBuilder
    from .persist import Persister
    from .publish import UpdatePublisher
    from .session import EtcdSession
# builder.py (and reader.py, where it gets its C kernels) is imported where first
# needed: a warm start publishes the state file before it needs a builder
# (~25 ms of a ~0.4 s warm start, measured with -X importtime).

log = logging.getLogger(__name__)


class Resumer:
    """The restore and resume of writer ``name`` (see module doc).

    It publishes through ``publishing`` (which it tells what it restored), tells
    ``persister`` how fresh the file is, reaches etcd through ``session``, and
    falls back to the writer's ``load`` (a full load). ``stop`` ends its waits;
    ``loaded`` is set once the writer follows etcd; threads it starts that the
    writer must join at stop go into ``threads``. ``pack`` decodes and packs a
    KeyValue like the writer's KeySpace decoder, without counting failures.
    """

    def __init__(
        self,
        name: str,
        keyspace: KeySpace,
        publisher: publisher.Publisher,
        changelog: ChangeLog,
        publishing: UpdatePublisher,
        persister: Persister,
        session: EtcdSession,
        *,
        state_dir: Optional[str],
        decoder_name: str,
        identity: int,
        stale_after: float,
        watch_silence: Optional[float],
        max_image: Callable[[], int],
        pack: Callable[[KeyValue], bytes],
        load: Callable[[], None],
        loaded: threading.Event,
        stop: threading.Event,
        threads: List[threading.Thread],
    ) -> None:
        self.name = name
        self.keyspace = keyspace
        self.publisher = publisher
        self.changelog = changelog
        self.publishing = publishing
        self.persister = persister
        self.session = session
        self.state_dir = state_dir
        self.decoder_name = decoder_name
        self.identity = identity
        self.stale_after = stale_after
        self.watch_silence = watch_silence
        self._max_image = max_image
        self._pack = pack
        self._load = load
        self._loaded = loaded
        self._stop = stop
        self._threads = threads
        #: The snapshot this writer started from: the state file, or its predecessor's
        #: image still in shared memory (``path`` then names the segment); None: it
        #: loaded from etcd.
        self.restored: Optional[state.StateFile] = None
        self._from_shm = False  # restored is the predecessor's image, not the file
        self._resumed = False  # restored and rebuilt: the watch may resume from the file
        # (key, create, mod, version) of the file's most recently modified key:
        # etcd must show the same at the file's revision (see history.differs).
        self._fingerprint: Optional[Tuple[bytes, int, int, int]] = None
        self._catchup: Optional[Tuple[int, int, int]] = None  # (etcd rev, count, max mod_revision)
        self._early: Any = None  # a watch opened ahead of the resume (KeySpace.open_watch)
        self._scanned: List[Any] = []  # [Top] of the restored image, once its entries passed
        # The probe thread (connect, probe, open the watch ahead): started by restore()
        # as soon as there is a file, so it overlaps the file's read and checks.
        self._prober: Optional[threading.Thread] = None
        self._probe_out: List[Tuple[int, int]] = []
        self._restore_done = threading.Event()

    # -- what the writer asks ---------------------------------------------------------
    def take_early(self) -> Any:
        """The watch opened ahead of the resume, if any, handed over once (None otherwise)."""
        with self.keyspace.lock:
            early, self._early = self._early, None
        return early

    def close_early(self) -> None:
        """Close the watch opened ahead, if it was not taken (the writer stops)."""
        early = self.take_early()
        if early is not None:
            early.close()

    def cancel_catch_up(self) -> None:
        """A full load made the mirror etcd's: no catch-up to wait for."""
        self._catchup = None

    # -- told by publishing (under keyspace.lock) ---------------------------------------
    def full_load(self, rev: int, n: int) -> None:
        """Full load #``n`` at ``rev`` is being published: it ends any catch-up."""
        self._catchup = None
        if self.restored is not None:
            log.warning(
                "full load #%d of %r from etcd at revision %d replaces the state file's snapshot",
                n,
                self.keyspace.root,
                rev,
            )

    def published(self) -> None:
        """A publication became visible: the mirror may have caught up with etcd."""
        if self._catchup is not None:
            self._check_caught_up()

    # -- fail static: state file -------------------------------------------------------
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
        if not self.state_dir or self.restored is not None or self._loaded.is_set():
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
        self.publishing.stamp(sf.cluster_id, sf.revision)
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
            self.publishing.restore_failed()
            log.error("publication of the state file of %r failed: %s", self.name, exc)
            return False
        self.publisher.heartbeat(sf.revision)
        self.restored = sf
        self.publishing.restored(sf.cluster_id, sf.revision, sf.excluded)
        self._scanned = scanned  # adopt() need not check the entries again
        # Nothing to write until something changes, and not before an interval.
        self.persister.written(sf.cluster_id, sf.revision)
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
        self.publishing.excluded_base = prev.excluded
        self._scanned = [top]
        # A load at this revision as far as the change feed can tell: readers asking
        # for changes from before it get ChangesTooOldError, not a gap.
        self.changelog.record(prev.revision, None)
        # The file on disk (if any) is behind what readers have: write it an
        # interval from now, when the catch-up is over.
        self.persister.behind()
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
                    view, self.keyspace.root_key, max_image=self._max_image(), scanned=self._scanned
                )
            finally:
                view.release()
        except (CorruptSegmentError, ImageTooLargeError, SegmentNotFoundError, UntrustedSegmentError) as exc:
            log.error("snapshot %s ignored: %s; loading from etcd instead", sf.path, exc)
            if not self._from_shm:
                state.discard(self.state_dir or "", self.name)
                self.persister.forget()
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

    # -- reaching etcd meanwhile ---------------------------------------------------------
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
                c = self.session.connect()
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
        """Connect and probe etcd, with backoff, until it answers or the writer stops.

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
                client = self.session.connect()
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

    def resume(self) -> None:
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
            if self.publishing.closed:
                return
            try:
                self.publisher.reserve_spare()
            except SegmentFullError as exc:
                log.debug(
                    "cannot reserve the next buffer of %r yet (%s): the publication will", self.name, exc
                )

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
                    differs = self._history_differs(self.session.connect())
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
            self.close_early()
            self.publishing.history_reset = cluster != sf.cluster_id or rev < sf.revision or bool(differs)
            if self._resumed:
                log.warning("state file %s discarded: %s; full load from etcd", sf.path, why)
                state.discard(self.state_dir or "", self.name)
            self.persister.forget()  # the next file may have a lower revision (another history)
            self._load()
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
        self._loaded.set()

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

    def _history_differs(self, client: Any) -> str:
        """Why etcd's history disagrees with the restored snapshot ("" if it agrees): history.differs."""
        fp, sf = self._fingerprint, self.restored
        if fp is None or sf is None:
            return ""
        b: ImageBuilder = self.keyspace.key_values.builder
        return history.differs(client, self.keyspace.root, self.keyspace.root_key, sf, fp, b, self._pack)
