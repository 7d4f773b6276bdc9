"""Writer: one process per snapshot name per host that mirrors etcd into shared memory.

Owns a :class:`KeySpace` (load + watch of one prefix, with Gazette's rules)
whose store is an :class:`ImageBuilder` of packed entries, the
:class:`Publisher` of the name, and the writer's lifecycle: its threads, the
heartbeat, the full load, run/start/stop. It promises:

* exclusivity: constructing a second Writer for a live name raises
  WriterExistsError naming the running writer's pid;
* per key it keeps what publishing needs (the packed entry and its
  mod_revision, ``store.py``), not a decoded mirror: the KeySpace's decoder is
  the user's decoder followed by :func:`pack_entry`, so a value msgpack cannot
  carry is rejected like any decode failure (logged, key left out, recoverable);
* every KeySpace update becomes one publication, made as an observer (under the
  KeySpace lock); the changed keys of each are in :attr:`PublishStats.changed_keys`
  (``publish.py``);
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
  next of its endpoints (see :meth:`KeySpace.watch`, ``session.py``).

Lifecycle: :meth:`run` blocks (load, then watch) and raises the fatal error,
also kept in :attr:`error`; :meth:`start` runs it on a thread once loaded;
:meth:`stop` ends it. Observers (``on_publish``, the first one, and
:meth:`add_publish_observer`) are called after every publication.
On exit the segments stay (readers keep the last snapshot and see the writer as
dead; a restarted writer takes over in place) unless ``unlink_on_exit``.

Fail static (``state_dir``): the writer persists what it publishes to
``STATE_DIR/NAME.snap`` (format and checks: ``state.py``) at most every
``persist_interval`` seconds when something changed, and on :meth:`stop`. The
file is written by a thread of its own from parts captured at publish time, so
persisting never holds up a publication beyond that capture (one copy of the
hash table; the append-only arena is referenced, not copied): ``persist.py``.
On start a valid file is published at once, before etcd is asked anything, with the control
block's source word set to "disk": read into a new segment no reader can see
yet and checked there, every entry included (a bad file never reaches
readers), while another thread connects; the writer then takes that image
over as its own state (ImageBuilder.adopt). Once etcd answers with the same cluster id
and a revision not behind the file's, the watch resumes from the file's
revision + 1 and the source becomes "etcd" when the mirror has caught up. A
full load happens only when etcd compacted past the file's revision, or the
cluster or its history differ (the file is discarded, with the reason logged):
``resume.py`` and ``history.py``.

Parts, each owned by the Writer (composition): :class:`~shmkeyspace.session.EtcdSession`
(the client and failover), :class:`~shmkeyspace.publish.UpdatePublisher` (the
KeySpace observer), :class:`~shmkeyspace.persist.Persister` (the persist thread),
:class:`~shmkeyspace.resume.Resumer` (restore and resume).

Locking: ``keyspace.lock`` guards the KeySpace, the store, every publication
(observers run under it) and the closing of the Publisher (:meth:`stop`);
``_fatal`` is written only by :meth:`_lose`, under ``keyspace.lock``. ``_stop``
and ``loaded`` are Events shared with the parts. The thread list is appended by
the threads that start threads (:meth:`run`, :meth:`start`, the resume's probe)
and joined by :meth:`stop`. Each part's docstring says what else it guards.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import accounting, apply, consistent, publisher, segment, state
from .errors import (
    ImageTooLargeError,
    InvalidSettingError,
    KeySpaceError,
    TransformError,
    WriterLostError,
    describe,
)
from .feed import DEFAULT_BYTES, DEFAULT_KEEP, ChangeLog
from .heap import trim_heap
from .key_values import KeyValue
from .keyspace import DEFAULT_APPLY_DELAY, DEFAULT_STALE_AFTER, DEFAULT_WATCH_SILENCE, KeySpace
from .load import LoadStatus, backoff
from .persist import DEFAULT_PERSIST_INTERVAL, Persister
from .publish import PublishObserver, PublishStats, UpdatePublisher
from .resume import Resumer
from .session import EtcdSession
from .snapshot import MAX_IMAGE, entry_key, pack_entry
from .store import PackedLoader, PackedStore
from .writer_facts import WriterFacts

#: Default ``view_grace`` (``--view-grace``): every snapshot view stays valid at
#: least this long. A buffer readers left is rewritten only this long after, so
#: under sustained churn publications are spaced by it (at most this much more
#: latency, measured in bench/view_grace.py); idle or slow changes pay nothing.
DEFAULT_VIEW_GRACE = 0.1

#: Backoff before a failed full load starts again, doubled per failure up to
#: LOAD_BACKOFF_MAX and jittered (load.backoff): a fleet whose loads all failed at
#: once (etcd overloaded by them) does not come back at once.
LOAD_BACKOFF = 1.0
LOAD_BACKOFF_MAX = 30.0
#: Load errors no retry can mend: raised at once.
_FATAL_LOAD_ERRORS = (KeySpaceError, WriterLostError, ImageTooLargeError, InvalidSettingError)

log = logging.getLogger(__name__)


class Writer(WriterFacts):
    """Mirror etcd keys under ``prefix`` into the snapshot ``name``.

    Either pass a python-etcd3-API ``client``, or ``endpoints`` (plus any keyword
    of :func:`shmkeyspace.etcd.connect` in ``connect_args``). ``apply_impl``: the
    path watch events take, "c" (``apply.py``: the built-in decoders, in C) or
    "python" (KeySpace.apply's loop, the reference); default ``SHMKEYSPACE_APPLY``,
    else "c" where the extension is built.
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
        apply_impl: Optional[str] = None,
        transform: Optional[Callable[[Any, Any], Any]] = None,
        transform_name: Optional[str] = None,
        account_depth: Optional[int] = None,
        sync: bool = True,
        load_attempts: Optional[int] = None,
    ) -> None:
        if client is None and endpoints is None:
            raise InvalidSettingError("Writer needs an etcd client or endpoints")
        if account_depth is not None and not account_depth >= 0:
            raise InvalidSettingError(f"account_depth must be >= 0 path segments, got {account_depth!r}")
        if not stale_after > 0:
            raise InvalidSettingError(f"stale_after must be > 0 seconds, got {stale_after!r}")
        if watch_silence is not None and not watch_silence >= 0:
            raise InvalidSettingError(
                f"watch_silence must be >= 0 seconds (0: no bound), got {watch_silence!r}"
            )
        #: A watch stream silent this long (no event, no progress notification) is
        #: re-opened although reads succeed (KeySpace.watch); None or 0: no bound.
        self.watch_silence = watch_silence or None
        if load_attempts is not None and load_attempts < 1:
            raise InvalidSettingError(
                f"load_attempts must be >= 1 (None: until stopped), got {load_attempts!r}"
            )
        #: Full loads tried before :meth:`load` gives up and raises (None: until stopped).
        self.load_attempts = load_attempts
        self._max_image = max_image_bytes
        #: The writer-side projection: ``transform(key, decoded) -> what readers get``
        #: (key: str, or bytes when not UTF-8), run after the decoder, before packing.
        #: A transform that raises leaves the key out, as a decoder failure does.
        self.transform = transform
        # A transform is Python code: the event loop stays in Python (apply.py
        # compiles the built-in decoders alone).
        self._apply_kind = apply.compiled_kind(decoder) if transform is None else None
        self._applier: Optional[apply.CompiledApply] = None
        self._apply_impl = "python"
        self._set_apply_impl(apply_impl or apply.default_impl())
        # validates prefix before any side effect
        self.keyspace = KeySpace(
            prefix, self._decode, store=lambda: PackedLoader(self._max_image, self._applier)
        )
        self.changelog = ChangeLog(changes_keep, changes_bytes)  # validates the sizes
        self.keyspace.watch_apply_delay = apply_delay
        self.name = segment.validate_name(name)
        self._user_decoder = decoder or (lambda kv: kv.value)
        # What a transform returns is not known to be readable: round-trip it.
        self._verify = transform is not None or not getattr(decoder, "msgpack_safe", decoder is None)
        self.session = EtcdSession(
            self.name, client, endpoints, connect_args or {}, stale_after, self.keyspace.root_key
        )
        self.stale_after = stale_after
        if persist_interval <= 0:
            raise InvalidSettingError(f"persist_interval must be > 0 seconds, got {persist_interval!r}")
        #: Recorded in the state file; a file written under another decoder is refused.
        self.decoder_name = decoder_name or _callable_name(decoder)
        self.transform_name: Optional[str] = None
        if transform is not None:
            # Part of what the images are a mirror of: a state file or predecessor
            # image made under another projection is not taken over.
            self.transform_name = transform_name or _callable_name(transform)
            self.decoder_name += f"|transform={self.transform_name}"
        # Checked before any segment exists: a writer that cannot start leaves nothing behind.
        self.state_dir = state.prepare_dir(state_dir) if state_dir else None
        self.publisher = publisher.Publisher(name, mode=mode, gid=gid, view_grace=view_grace)
        #: What the published images are a mirror of (segment.identity): a restarted
        #: writer takes its predecessor's image over only when this matches.
        self.identity = segment.identity(self.keyspace.root_key, self.decoder_name)
        prev = self.publisher.previous
        # (cluster id, revision, epoch) of the last publication on this name, this
        # writer's or its predecessor's (UpdatePublisher.last_pub).
        last = (prev.cluster_id, prev.revision, prev.epoch) if prev is not None else (0, 0, 0)
        if prev is not None and prev.identity != self.identity:
            # Another prefix or decoder under this name: what follows is not a
            # continuation of what readers have.
            last = (0, 0, prev.epoch + 1)
        #: Set when the writer lost its name (WriterLostError): run() raises it.
        self._fatal: Optional[BaseException] = None
        self.publisher.set_heartbeat_interval(heartbeat_interval)
        self.publisher.set_stale_after(stale_after)
        self.keyspace.on_contact = self.publisher.set_contact
        self.heartbeat_interval = heartbeat_interval
        self.unlink_on_exit = unlink_on_exit
        self._sync_args = (mode, gid) if sync else None
        #: Answers readers' sync() while the watch runs (consistent.py), or None.
        self.sync_server: Optional[consistent.SyncServer] = None
        #: Turns every KeySpace update into one publication (publish.py).
        self.publishing = UpdatePublisher(
            self.name, self.keyspace, self.publisher, self.changelog, self.identity, last, self._lose
        )
        self.keyspace.observers.append(self.publishing)
        #: The first publish observer, as given (see add_publish_observer).
        self.on_publish = on_publish
        if on_publish is not None:
            self.publishing.add_observer(on_publish)
        #: Values the decoder rejected (metrics).
        self.decode_failures = 0
        self.loaded = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: List[threading.Thread] = []
        self._hb: Optional[threading.Thread] = None
        self._pt: Optional[threading.Thread] = None  # the persist thread
        # -- fail static ----------------------------------------------------------
        self.mode, self.gid = mode, gid
        #: Writes the state file from a thread of its own (persist.py).
        self.persister = Persister(
            self.name,
            self.keyspace,
            self.publisher,
            self.publishing,
            self._stop,
            state_dir=self.state_dir,
            decoder_name=self.decoder_name,
            interval=persist_interval,
            mode=mode,
            gid=gid,
        )
        #: Restores the last snapshot on start and resumes the watch from it (resume.py).
        self.resumer = Resumer(
            self.name,
            self.keyspace,
            self.publisher,
            self.changelog,
            self.publishing,
            self.persister,
            self.session,
            state_dir=self.state_dir,
            decoder_name=self.decoder_name,
            identity=self.identity,
            stale_after=stale_after,
            watch_silence=self.watch_silence,
            max_image=lambda: self._max_image,
            pack=self._pack,
            load=self.load,
            loaded=self.loaded,
            stop=self._stop,
            threads=self._threads,
        )
        self.publishing.attach(self.persister, self.resumer)
        if account_depth is not None:
            #: Keys and bytes per prefix (accounting.py; metrics), or None: off.
            self.publishing.accounting = accounting.PrefixBytes(account_depth)
        if self.state_dir:
            state.remove_temps(self.state_dir, self.name)  # we hold the writer lock now

    # -- the apply path -------------------------------------------------------------
    def _set_apply_impl(self, impl: str) -> None:
        if impl not in apply.IMPLEMENTATIONS:
            raise InvalidSettingError(f"apply_impl must be one of {apply.IMPLEMENTATIONS}, not {impl!r}")
        self._apply_impl = impl
        use_c = impl == "c" and self._apply_kind is not None
        self._applier = apply.CompiledApply(self._apply_kind) if use_c and self._apply_kind else None

    @property
    def apply_impl(self) -> str:
        """The path watch events take: "c" (apply.py, built-in decoders only) or "python".

        "c" asked for with a decoder it does not know reads back "python". Settable
        (tests, benchmarks): the next batch takes the new path.
        """
        return "c" if self._applier is not None else "python"

    @apply_impl.setter
    def apply_impl(self, impl: str) -> None:
        with self.keyspace.lock:
            self._set_apply_impl(impl)
            self._attach_applier()

    def _attach_applier(self) -> None:
        store = self.keyspace.key_values
        if isinstance(store, PackedStore):
            store.set_applier(self._applier)

    # -- decode + pack (the KeySpace's decoder) -----------------------------------
    def _pack(self, kv: KeyValue) -> bytes:
        decoded = self._user_decoder(kv)
        if self.transform is not None:
            try:
                decoded = self.transform(entry_key(kv.key), decoded)
            except Exception as exc:
                raise TransformError(
                    f"transform {self.transform_name} rejected key {kv.key!r}: {exc!r}"
                ) from exc
        return pack_entry(
            kv.key,
            decoded,
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease,
            self._verify,
        )

    def _decode(self, kv: KeyValue) -> bytes:
        # Packing here makes "not msgpack-serializable" a decode failure, and the
        # KeySpace keeps the packed entry (not the decoded value) in its store.
        try:
            return self._pack(kv)
        except Exception:
            self.decode_failures += 1
            raise

    # -- publish observers ------------------------------------------------------------
    def add_publish_observer(self, fn: PublishObserver) -> None:
        """Call ``fn(stats)`` with the :class:`PublishStats` of every publication from now on.

        Observers run in the order they were added (``on_publish`` first), on the
        publishing thread under the KeySpace lock: keep them short. One that
        raises is logged; the writer and the other observers go on.
        """
        self.publishing.add_observer(fn)

    # -- state --------------------------------------------------------------------
    def prefix_bytes(self) -> Optional[List[Tuple[str, int, int]]]:
        """``(prefix, keys, bytes)`` per prefix, largest first (accounting.top), or None when
        ``account_depth`` is off. Thread-safe (a copy). O(prefixes)."""
        acc = self.publishing.accounting
        return None if acc is None else accounting.top(acc.snapshot())

    # -- fail static ------------------------------------------------------------------
    def restore(self) -> bool:
        """Publish the state file, if there is a valid one; True if it was published.

        Call before :meth:`run` (``run``/``start`` call it themselves). Cost: the
        file is read straight into shared memory (Publisher.publish_from) and
        checked there: one read and one checksum pass (~0.35 s at 1M keys,
        new segment included); etcd is not contacted. A bad file is logged and
        ignored; readers never see it. (Resumer.restore)
        """
        ok = self.resumer.restore()
        if ok:
            with self.keyspace.lock:  # the resume built the store from the file's image
                self._attach_applier()
        return ok

    def persist_now(self) -> None:
        """Write the state file now unless it already holds what is published (blocks).

        Waits for a write in flight first (stop() relies on this: a daemon
        thread killed mid-write at exit would leave the file behind).
        """
        self.persister.persist_now()

    def _lose(self, exc: WriterLostError) -> None:
        """The name is no longer this writer's: stop for good (run() raises ``exc``). Under keyspace.lock."""
        if self._fatal is None:
            self._fatal = exc
            log.error("%s", exc)
        self._stop.set()

    # -- running --------------------------------------------------------------------
    def connect(self) -> Any:
        """The etcd client, connected on first use (EtcdSession.connect)."""
        return self.session.connect()

    def load(self) -> None:
        """Connect if needed and load the prefix, publishing it (progress logged for big ones).

        A slow page is retried inside the load (``load.py``); a load that fails
        anyway (a page out of tries, etcd gone, a compacted revision) starts
        again after a jittered exponential backoff (LOAD_BACKOFF up to
        LOAD_BACKOFF_MAX), moving to the next endpoint when the writer has
        several, until it succeeds (etcd unreachable at the first connect raises
        at once), ``load_attempts`` loads have failed (then
        the last error is raised), or the writer stops. Meanwhile the control
        block says "loading" or "waiting" (``stat``, metrics).
        """
        self._start_heartbeat()
        ks = self.keyspace
        st = ks.load_status
        t0 = time.monotonic()
        last = [t0]

        def progress(n: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                log.info("loading %r: %d keys so far", ks.root, n)

        # A wrong address fails here, at once, as before any load (the CLI's fail-fast);
        # once etcd has answered, a failure is waited out.
        client = self.connect()
        failed = 0
        while True:
            st.state = "loading"
            self._publish_load_status()
            try:
                client = (
                    self.connect() if failed == 0 or not self.session.fails_over else self.session.reconnect()
                )
                ks.load(client, progress=progress, stop=self._stop)
                break
            except _FATAL_LOAD_ERRORS:
                raise
            except Exception as exc:
                failed += 1
                if self._stop.is_set() or (self.load_attempts and failed >= self.load_attempts):
                    raise
                st.restarts += 1
                st.state = "waiting"
                st.last_error = describe(exc)
                self._publish_load_status()
                wait = backoff(failed, LOAD_BACKOFF, LOAD_BACKOFF_MAX)
                log.warning(
                    "full load of %r failed after %d keys (%s): starting it again in %.2fs (restart %d)",
                    ks.root,
                    st.keys,
                    st.last_error,
                    wait,
                    st.restarts,
                )
                if self._stop.wait(wait):
                    raise
            finally:
                self._publish_load_status()
        self.resumer.cancel_catch_up()
        ks.note_contact()
        trimmed = trim_heap()
        log.info(
            "loaded %r at revision %d: %d keys in %.2fs%s; published as %r",
            ks.root,
            ks.header.revision,
            self.key_count,
            time.monotonic() - t0,
            " (RangeStream)" if st.streamed else "",
            self.name,
        )
        log.debug("heap trimmed after the load: %s", trimmed)
        self.loaded.set()

    def _publish_load_status(self) -> None:
        st = self.keyspace.load_status
        if self.publisher.ctrl is not None:
            self.publisher.set_load_status(st.state, st.keys, st.page_retries, st.restarts)

    @property
    def load_status(self) -> LoadStatus:
        """What the full loads are doing: state, keys so far, page retries, restarts (load.py)."""
        return self.keyspace.load_status

    def run(self) -> None:
        """Load (or resume from the state file), then watch until :meth:`stop`. Blocks.

        Raises the error that stopped the writer (also kept in :attr:`error`);
        returns normally after :meth:`stop`.
        """
        try:
            self._start_heartbeat()
            if self.state_dir and self._pt is None:
                self._pt = self.persister.thread()
                self._threads.append(self._pt)
                self._pt.start()
            if not self.loaded.is_set():
                if self.restore():
                    self.resumer.resume()
                else:
                    self.load()
            if not self._stop.is_set():
                self._start_sync_server()
                early = self.resumer.take_early()
                self.keyspace.watch(
                    self.connect(),
                    self._stop,
                    stale_after=self.stale_after,
                    reconnect=self.session.reconnect if self.session.fails_over else None,
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
            self._close_sync_server()
            self._done.set()

    # -- consistent reads (consistent.py) ---------------------------------------------------
    def _start_sync_server(self) -> None:
        if self._sync_args is None or self.sync_server is not None:
            return
        mode, gid = self._sync_args
        ks = self.keyspace
        self.sync_server = consistent.SyncServer(
            self.name,
            lambda: consistent.etcd_revision(self.connect(), ks.root_key),
            lambda rev: consistent.etcd_state(self.connect(), ks.root_key, rev),
            lambda target: consistent.reached(ks, self.publishing, self.publisher, target),
            mode=mode,
            gid=gid,
            timeout=max(1.0, self.stale_after),
            # A write under the prefix reaches the snapshot after the apply delay.
            quick=2 * self.keyspace.watch_apply_delay + 0.05,
        )

    def _close_sync_server(self) -> None:
        s, self.sync_server = self.sync_server, None
        if s is not None:
            s.close()

    def start(self) -> "Writer":
        """Publish, then run the watch on a thread; returns once the first snapshot is published.

        That is the state file's snapshot when there is a valid one (published
        before etcd is contacted), else the first full load, made here.
        """
        if not self.loaded.is_set() and not self.restore():
            self.load()
        self._start_sync_server()  # before returning: a sync() right after start() finds it
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
        if self._hb is None and not self.publishing.closed:
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
                    if not self.publishing.closed:
                        try:
                            self.publisher.check_owner()  # retires the block, raises WriterLostError
                        except WriterLostError as exc:
                            self._lose(exc)
                return
            ks = self.keyspace
            self.publisher.heartbeat(max(ks.etcd_revision, ks.header.revision))
            if ks.load_status.state != "idle" or not self.loaded.is_set():
                self._publish_load_status()
            if self.publishing.unpublished:
                self.publishing.retry()
            self._stop.wait(self.heartbeat_interval)

    def stop(self) -> None:
        """Stop watching, write the state file if it is behind, release the writer lock
        (and unlink if asked). Idempotent."""
        self._stop.set()
        self.resumer.close_early()
        self.persister.wake()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)
        if self.publishing.closed:
            return
        try:
            if self._fatal is None:  # a writer that lost its name may share the state dir with its successor
                self.persist_now()  # the last publication survives a clean exit
        except Exception:
            log.exception("final write of the state file of %r failed", self.name)
        self._close_sync_server()
        with self.keyspace.lock:
            self.publishing.close(unlink=self.unlink_on_exit)
        self.session.close()

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
