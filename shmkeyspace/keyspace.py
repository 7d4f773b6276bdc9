"""KeySpace: a decoded, in-process mirror of an etcd prefix (Gazette's keyspace).

A KeySpace owns ``header`` and ``key_values``; both change only under ``lock``
(a re-entrant lock standing in for Gazette's RWMutex), and observers run, in
order, while that lock is still held. It promises:

* ``header.revision`` is the revision at which the mirror is known exact: the
  revision of the load, then the greatest revision of an event under ``root``
  that was applied. Progress notifications and writes outside ``root`` never
  raise it; a delete raises it to the delete's revision.
* A value the decoder rejects is logged and left out (removed if present);
  a later valid value brings the key back.
* :meth:`apply` raises only unrecoverable errors (a foreign cluster, a revision
  going backwards, a watch error); inconsistent events are logged and skipped.
* :meth:`watch` survives etcd outages (reconnect with backoff, resume from
  ``header.revision + 1``) and compaction (reload at the current revision and
  swap in one update: observers never see a half-loaded space).
* :meth:`watch` never goes silently stale: ``etcd_contact_ns`` is the last time
  etcd answered (events, progress, probes); with no answer for ``stale_after``
  the stream is abandoned and the watch reconnects (through ``reconnect``, to
  the next endpoint). A member that loses its leader cancels the stream
  (require-leader metadata).

Parts kept in modules of their own: the full load (streamed or paged, its
retries: ``load.py``, :func:`~shmkeyspace.load.fetch`) and the watch streams
(:class:`~shmkeyspace.watch.WatchSession`, :class:`~shmkeyspace.watch.WatchThread`:
``watch.py``); the names above stay importable from here.

The etcd client is anything with the python-etcd3 API (``etcd3`` or
``etcd-sdk-python``'s ``pyetcd``); see :mod:`shmkeyspace.etcd`.
"""

from __future__ import annotations

import logging
import posixpath
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Protocol, Set

from .errors import (
    EtcdContactLostError,
    InvalidPrefixError,
    KeySpaceError,
    ShmKeyspaceError,
    describe,
)
from .key_values import KeyValue, KeyValues, to_key
from .load import FIRST_PAGE, MIN_TIMEOUT_PAGE, PAGE_BYTES, LoadStatus, fetch
from .watch import WatchSession, WatchThread, pump

#: The old private name of WatchSession (tests patch it).
_Session = WatchSession

__all__ = [
    "DEFAULT_APPLY_DELAY",
    "DEFAULT_STALE_AFTER",
    "DEFAULT_WATCH_SILENCE",
    "FIRST_PAGE",
    "MIN_TIMEOUT_PAGE",
    "PAGE_BYTES",
    "Header",
    "KeySpace",
    "KeySpaceError",
    "LoadStatus",
    "StartCompactedError",
    "WatchThread",
]

_new_kv = tuple.__new__
log = logging.getLogger(__name__)

Decoder = Callable[[KeyValue], Any]
Observer = Callable[[], None]


class Store(Protocol):
    """Where a KeySpace keeps its keys (``key_values``); :class:`KeyValues` by default.

    The KeySpace decides what changes (the Gazette rules live only in
    :meth:`KeySpace.apply` and :meth:`KeySpace.load`); a store only records it.
    The writer uses a store of packed entries instead of decoded KeyValues.
    """

    def __len__(self) -> int: ...
    def mod_revision(self, key: bytes) -> Optional[int]: ...
    def upsert(self, kv: KeyValue) -> Any: ...
    def remove(self, key: bytes) -> Any: ...


class StoreLoader(Protocol):
    """Builds a Store from a load's decoded KeyValues, added in key order."""

    def add(self, kv: KeyValue) -> None: ...
    def finish(self) -> Any: ...


#: Gazette's default Nagle-like delay before applying watch responses.
DEFAULT_APPLY_DELAY = 0.030
#: Seconds without contact with etcd after which the mirror counts as stale and
#: the watch abandons its stream (the writer's --stale-after).
DEFAULT_STALE_AFTER = 5.0
#: Seconds a watch stream may deliver nothing at all (no event, no progress
#: notification) before it is abandoned although etcd answers reads: 3 x etcd's
#: default --experimental-watch-progress-notify-interval (10 min). Direct to etcd
#: the writer's progress requests are answered every stale_after / 4; behind a gRPC
#: proxy they are not (etcd issue 19710) and only the server's own notifications
#: arrive, so lower it together with that interval (e.g. 5 s -> 15 s).
DEFAULT_WATCH_SILENCE = 1800.0


@dataclass(frozen=True)
class Header:
    """The etcd response header the KeySpace is current to (see module doc)."""

    cluster_id: int = 0
    member_id: int = 0
    revision: int = 0
    raft_term: int = 0


class StartCompactedError(ShmKeyspaceError):
    """The revision a watch would start from has been compacted: the mirror reloads.

    ``compacted_revision`` is that start revision, a lower bound of etcd's
    compact revision (a Range does not report the exact one).
    """

    def __init__(self, start: int) -> None:
        super().__init__(f"revision {start} is compacted")
        self.compacted_revision = start


def patch_header(h: Header, update: Any, reset: bool = False) -> Header:
    """Gazette's patchHeader: validate ``update`` against ``h``; keep h's revision."""
    cid = int(getattr(update, "cluster_id", 0))
    if cid == 0:
        raise KeySpaceError("etcd response header has ClusterId 0")
    if h.cluster_id and h.cluster_id != cid and not reset:
        raise KeySpaceError(f"etcd ClusterId mismatch (expected {h.cluster_id}, got {cid})")
    rev = int(update.revision)
    if rev < h.revision and not reset:
        raise KeySpaceError(f"etcd Revision mismatch (expected >= {h.revision}, got {rev})")
    return Header(cid, int(update.member_id), h.revision, int(update.raft_term))


def _event_kv(ev: Any, key: bytes, mod: int) -> KeyValue:
    """The raw KeyValue of a put event (``key`` and ``mod`` already read from it), as
    KeySpace.apply's loop builds it (inline there: a call costs ~0.1 us an event)."""
    return KeyValue(key, bytes(ev.value), int(ev.create_revision), mod, int(ev.version), int(ev.lease), None)


def _is_delete(ev: Any) -> bool:
    # python-etcd3 and pyetcd wrap events as PutEvent / DeleteEvent.
    return type(ev).__name__ == "DeleteEvent"


def _root_forms(clean: str) -> str:
    """What each accepted spelling of an unclean root would mirror (for its error message)."""
    if clean.endswith("/"):
        return f"use {clean!r} (posixpath.normpath)"
    return (
        f"{clean!r} mirrors every key starting with {clean} (also {clean}-old/...), "
        f"{clean + '/'!r} mirrors only keys under {clean}/"
    )


class KeySpace:
    """A local, decoded mirror of the etcd keys under ``root``.

    ``root`` is a key prefix in the clean form of :func:`posixpath.normpath`
    (as in Gazette, it is a plain prefix: ``/a`` also covers ``/ab``), or that
    form plus one trailing ``/`` for exactly the keys under a directory.
    """

    def __init__(
        self,
        root: str,
        decoder: Optional[Decoder] = None,
        store: Callable[[], StoreLoader] = KeyValues.loader,
    ) -> None:
        if not isinstance(root, str) or not root:
            raise InvalidPrefixError(f"KeySpace root must be a non-empty str, got {root!r}")
        clean = posixpath.normpath(root)
        # We deviate from Gazette, which takes only the clean form: a root ending
        # in "/" is accepted and means the keys under that directory only
        # ("/services/" leaves out "/services-old/..."), which no clean root can say.
        if root != clean and root != clean + "/":
            raise InvalidPrefixError(f"prefix {root!r} is not clean: {_root_forms(clean)}")
        self.root: str = root
        self.root_key: bytes = to_key(root)
        self.decoder: Decoder = decoder or (lambda kv: kv.value)
        #: Guards header, key_values and observers' view of them.
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self.header = Header()
        self._new_store = store
        #: The keys (a :class:`KeyValues` unless another ``store`` was given).
        self.key_values: Any = store().finish()
        #: Called in order after every update, with ``lock`` held.
        self.observers: List[Observer] = []
        #: Nagle-like delay in seconds before applying watch responses.
        self.watch_apply_delay: float = DEFAULT_APPLY_DELAY
        #: Keys changed by the update being observed; None means "everything"
        #: (a load or reload). Valid only inside observers.
        self.changed_keys: Optional[Set[bytes]] = None
        #: Newest etcd revision heard of (any response header, progress included).
        self.etcd_revision = 0
        self._excluded: Set[bytes] = set()  # keys present in etcd whose value failed to decode
        #: time.monotonic_ns() of the last answer from etcd (0: none yet); see note_contact.
        self.etcd_contact_ns = 0
        #: Called with etcd_contact_ns at each contact, on the thread that heard etcd.
        self.on_contact: Optional[Callable[[int], None]] = None
        #: Why the last watch stream ended (None while the first one runs).
        self.last_watch_error: Optional[str] = None
        #: What loads are doing: state, keys so far, page retries (load.py).
        self.load_status = LoadStatus()
        self._update_event = threading.Event()

    # -- decoding -------------------------------------------------------------
    def _decode(self, raw: KeyValue) -> Optional[KeyValue]:
        try:
            decoded = self.decoder(raw)
        except Exception as exc:  # the decoder's failure is data, not a crash
            log.warning("decode of key %r at mod_revision %d failed: %s", raw.key, raw.mod_revision, exc)
            return None
        # Not raw._replace(): that costs ~4 us a key, a third of a 100k-key load.
        return _new_kv(KeyValue, (*raw[:6], decoded))

    # -- updates --------------------------------------------------------------
    def _on_update(self, changed: Optional[Set[bytes]]) -> None:
        self.changed_keys = changed
        try:
            for obs in self.observers:
                obs()
        finally:
            self.changed_keys = None
            ev, self._update_event = self._update_event, threading.Event()
            ev.set()
            self._cond.notify_all()

    def update(self) -> threading.Event:
        """An Event set at the next update (Gazette's ``Update()`` channel)."""
        with self.lock:
            return self._update_event

    def wait_for_revision(self, revision: int, timeout: Optional[float] = None) -> bool:
        """Block until ``header.revision >= revision``; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.header.revision >= revision, timeout)

    def apply(self, *responses: Any) -> None:
        """Apply watch responses (objects with ``header`` and ``events``) in one update.

        Raises :class:`KeySpaceError` (or the watch's own exception) only when the
        responses cannot be reconciled; then the KeySpace is left unchanged.
        """
        with self.lock:
            hdr = self.header
            for wr in responses:
                if isinstance(wr, BaseException):
                    raise wr
                hdr = patch_header(hdr, wr.header)
                self.etcd_revision = max(self.etcd_revision, int(wr.header.revision))
            kvs = self.key_values
            changed: Set[bytes] = set()
            revision = hdr.revision
            apply_events = getattr(kvs, "apply_events", None)
            if apply_events is not None:
                # The store's own loop (the writer's compiled path, apply.py): the
                # rules of the loop below, which is the reference, with its messages
                # (_skipped) and its decode of any event it does not take itself.
                revision = apply_events(
                    responses,
                    self.root_key,
                    self.header.revision,
                    self._excluded,
                    self._decode_event,
                    self._skipped,
                    changed,
                    revision,
                )
            for wr in responses if apply_events is None else ():
                for ev in wr.events:
                    key, mod = bytes(ev.key), int(ev.mod_revision)
                    if not key.startswith(self.root_key):
                        self._skipped(0, key, 0, 0)
                        continue
                    cur = kvs.mod_revision(key)
                    if mod <= self.header.revision or (cur is not None and cur >= mod):
                        self._skipped(1, key, mod, max(self.header.revision, cur or 0))
                        continue
                    if _is_delete(ev):
                        if cur is None and key not in self._excluded:
                            self._skipped(2, key, mod, 0)
                            continue
                        kvs.remove(key)
                        self._excluded.discard(key)
                    else:
                        raw = KeyValue(
                            key,
                            bytes(ev.value),
                            int(ev.create_revision),
                            mod,
                            int(ev.version),
                            int(ev.lease),
                            None,
                        )
                        kv = self._decode(raw)
                        if kv is None:
                            self._excluded.add(key)
                            kvs.remove(key)
                        else:
                            self._excluded.discard(key)
                            kvs.upsert(kv)
                    changed.add(key)
                    revision = max(revision, mod)
            if not changed:
                # Progress notification or nothing consistent: keep the revision.
                self.header = hdr
                return
            self.header = replace(hdr, revision=revision)
            self._on_update(changed)

    def _skipped(self, code: int, key: bytes, a: int, b: int) -> None:
        """Log an event :meth:`apply` skips: 0 outside root, 1 stale (a: its mod_revision,
        b: the mirror's), 2 deletion of an unknown key (a: its revision)."""
        if code == 0:
            log.error("watch event for key %r outside root %r: skipped", key, self.root)
        elif code == 1:
            log.error("stale event for key %r (mod_revision %d, mirror at %d): skipped", key, a, b)
        else:
            log.error("deletion of unknown key %r at revision %d: skipped", key, a)

    def _decode_event(self, ev: Any) -> Any:
        """The decoded value of a put event as :meth:`apply` keeps it, or None (decode failed, logged)."""
        kv = self._decode(_event_kv(ev, bytes(ev.key), int(ev.mod_revision)))
        return None if kv is None else kv.decoded

    def restore(self, header: Header, key_values: Any) -> None:
        """Adopt ``key_values`` as the mirror, exact at ``header.revision``, quietly.

        For a writer resuming from its state file: the caller has published the
        same data already, so observers are not called. A later :meth:`watch`
        resumes from ``header.revision + 1`` under the usual rules (stale events
        skipped by mod_revision). Keys that failed to decode before the file was
        written are not known; a later delete of one is logged and skipped.
        """
        with self.lock:
            self.header = header
            self.etcd_revision = max(self.etcd_revision, header.revision)
            self.key_values = key_values
            self._excluded = set()

    @property
    def excluded_count(self) -> int:
        """How many keys under root are in etcd but left out (their decode failed). O(1)."""
        return len(self._excluded)

    # -- etcd I/O -------------------------------------------------------------
    def new_loader(self) -> StoreLoader:
        """An empty loader of this KeySpace's store (for a load, ``load.py``). O(1)."""
        return self._new_store()

    def decode_raw(self, raw: KeyValue) -> Optional[KeyValue]:
        """``raw`` with its decoded value, or None (logged) if the decoder rejects it."""
        return self._decode(raw)

    def load(
        self,
        client: Any,
        rev: int = 0,
        page_size: Optional[int] = None,
        progress: Optional[Callable[[int], None]] = None,
        page_bytes: int = PAGE_BYTES,
        stop: Optional[threading.Event] = None,
    ) -> None:
        """Load every key under root at revision ``rev`` (0: now): streamed, or page by page.

        All keys are read at one revision, so the result is a consistent cut; it
        replaces the current contents in one update. Through etcd's RangeStream
        when the server has it (etcd >= 3.7) and no ``page_size`` is forced, else
        in pages: the first asks FIRST_PAGE keys, later ones about ``page_bytes``
        (see PAGE_BYTES), never more than ``page_size`` keys when given (tests
        force many pages so). A page that times out is asked again, smaller, at
        the same revision (``load.py``); ``stop`` cuts its backoff short.
        ``progress(n)`` is called with the count loaded so far after each page
        or chunk; :attr:`load_status` tells the state and the retries. Cost:
        etcd's work (its count walk per page: few pages) plus the decoder's,
        linear in keys and bytes.
        """
        st = self.load_status
        st.state = "loading"
        try:
            header, kvs, excluded = fetch(self, client, rev, page_size, page_bytes, progress, st, stop)
        except BaseException as exc:
            st.last_error = describe(exc)
            raise
        finally:
            st.state = "idle"
        with self.lock:
            self.header = header
            self.etcd_revision = max(self.etcd_revision, header.revision)
            self.key_values = kvs
            self._excluded = excluded
            self._on_update(None)

    def note_contact(self) -> None:
        """Record that etcd answered just now. Cost: a clock read and :attr:`on_contact`.

        Called from whichever thread heard etcd (the watch stream's, a probe's, a load).
        """
        ns = time.monotonic_ns()
        self.etcd_contact_ns = ns
        cb = self.on_contact
        if cb is not None:
            cb(ns)

    def watch(
        self,
        client: Any,
        stop: Optional[threading.Event] = None,
        max_backoff: float = 5.0,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        reconnect: Optional[Callable[[], Any]] = None,
        first: Optional["WatchSession"] = None,
        watch_silence: Optional[float] = None,
    ) -> None:
        """Apply etcd's watch stream until ``stop`` is set. Blocks.

        Resumes from ``header.revision + 1`` after any failure, reloads on
        compaction, and re-raises only :class:`KeySpaceError`.

        Contact: every response on the stream counts (:meth:`note_contact`).
        After ``stale_after / 4`` without one it asks etcd for progress; where
        progress requests go unanswered while a deadline-bound read succeeds (the
        gRPC proxy, etcd issue 19710; the ``etcd3`` library's old protocol code)
        that read is the check instead. No contact for ``stale_after`` seconds:
        the stream is abandoned. The stream carries etcd's require-leader
        metadata, so a member that loses its leader cancels it.

        ``watch_silence`` (seconds, None: no bound): a stream that delivers
        nothing at all for that long, not even a progress notification, is
        abandoned and opened again even though reads keep the contact fresh: a
        gRPC proxy can leave a watcher on a broadcast that never delivers again
        (etcd issue 21813). Departure from plain etcd semantics: a healthy but
        idle stream behind a proxy with no progress notifications inside the
        bound is re-opened too (cheap: one Watch call, from the same revision).

        After a stream ends for any reason but compaction, ``reconnect()`` (if
        given) returns the client to continue with: the writer's moves on to the
        next endpoint. Without it the same client is used again.

        ``first``: a stream :meth:`open_watch` opened ahead of time, used as
        the first one if it starts at ``header.revision + 1`` on ``client``
        (its events have been queueing meanwhile); else it is closed.
        """
        stop = stop or threading.Event()
        try:
            self._watch_loop(client, stop, max_backoff, stale_after, reconnect, first, watch_silence)
        finally:
            if first is not None and not first.closed:
                first.close()

    def open_watch(
        self,
        client: Any,
        start: int,
        stale_after: float = DEFAULT_STALE_AFTER,
        watch_silence: Optional[float] = None,
    ) -> "WatchSession":
        """Open a watch stream from revision ``start`` now, to hand to :meth:`watch` as ``first``.

        Lets a caller that knows where it will resume (a writer restoring a
        state file) have etcd gather and send the missed events while it is
        still busy; they queue until :meth:`watch` applies them. Checks the
        start like :meth:`watch` (StartCompactedError); close the result if
        it is not used.
        """
        session = WatchSession(self, client, queue.Queue(), stale_after, start, watch_silence)
        try:
            self._check_start(client, start)
            session.open()
        except BaseException:
            session.close()
            raise
        return session

    def _watch_loop(
        self,
        client: Any,
        stop: threading.Event,
        max_backoff: float,
        stale_after: float,
        reconnect: Optional[Callable[[], Any]],
        first: Optional["WatchSession"],
        watch_silence: Optional[float] = None,
    ) -> None:
        backoff = 0.05
        move_on = False
        while not stop.is_set():
            if move_on and reconnect is not None:
                try:
                    client = reconnect()
                except Exception as exc:
                    log.warning("reconnecting to etcd failed (%s); retrying in %.2fs", describe(exc), backoff)
                    stop.wait(backoff)
                    backoff = min(max_backoff, backoff * 2)
                    continue
            move_on = False
            early, first = first, None
            q: "queue.Queue[Any]"
            if early is not None and early.start == self.header.revision + 1 and early.client is client:
                session, q = early, early.q
            else:
                if early is not None:
                    early.close()
                q = queue.Queue()
                session = WatchSession(self, client, q, stale_after, watch_silence=watch_silence)
            try:
                if session is not early:
                    self._check_start(client)
                    session.open()
            except Exception as exc:
                session.close()
                if self._handle_watch_error(client, exc):
                    backoff = 0.05
                    continue
                log.warning(
                    "etcd watch of %r failed (%s); retrying in %.2fs", self.root, describe(exc), backoff
                )
                self.last_watch_error = describe(exc)
                move_on = True
                stop.wait(backoff)
                backoff = min(max_backoff, backoff * 2)
                continue
            log.info("watching %r from revision %d", self.root, self.header.revision + 1)
            try:
                err = pump(self, q, stop, session)
            finally:
                session.close()
            if err is None or self._handle_watch_error(client, err):
                backoff = 0.05
                continue
            self.last_watch_error = describe(err)
            move_on = True
            if session.responses:
                backoff = 0.05  # it was a healthy stream: start over with short waits
            if isinstance(err, EtcdContactLostError):
                # No wait: another member may be fine, and reconnect() probes with a deadline.
                log.warning(
                    "etcd watch of %r: %s; abandoning the stream, resuming from revision %d",
                    self.root,
                    err,
                    self.header.revision + 1,
                )
                continue
            log.warning(
                "etcd watch of %r broke (%s); resuming from revision %d in %.2fs",
                self.root,
                describe(err),
                self.header.revision + 1,
                backoff,
            )
            stop.wait(backoff)
            backoff = min(max_backoff, backoff * 2)

    def _check_start(self, client: Any, start: Optional[int] = None) -> None:
        """Raise :class:`StartCompactedError` if a watch from ``header.revision + 1`` would be compacted.

        Why ask before watching: behind etcd's gRPC proxy a compacted watch leaves a
        dead shared upstream watch ("broadcast") that later watchers of the same
        prefix can be attached to, after which they never receive another event
        (etcd issues 21813, 10650; seen in tests/test_proxy.py when 10 writers came
        back after a compaction). A writer that never starts a compacted watch never
        creates one. Cost: one linearizable single-key Range at that revision (never
        served from the proxy's cache); etcd answers "compacted" exactly when the
        watch would be (start < compact revision), "future revision" when nothing is
        newer, which is fine.
        """
        start = self.header.revision + 1 if start is None else start
        try:
            client.get_range_response(self.root_key, None, revision=start, keys_only=True, limit=1)
        except Exception as exc:
            details = getattr(exc, "details", None)
            text = details() if callable(details) else str(exc)
            if "compacted" in str(text):
                raise StartCompactedError(start) from None
            if "future revision" not in str(text):
                raise

    def _handle_watch_error(self, client: Any, exc: BaseException) -> bool:
        """Reload on compaction (True); re-raise the unrecoverable; else False."""
        if isinstance(exc, KeySpaceError):
            raise exc
        if hasattr(exc, "compacted_revision"):
            log.warning(
                "watch of %r at revision %d was compacted (compact revision %d): reloading",
                self.root,
                self.header.revision + 1,
                exc.compacted_revision,
            )
            try:
                self.load(client)
            except Exception as lexc:  # etcd went away mid-reload: back off, retry
                log.warning("reload of %r failed: %s", self.root, describe(lexc))
                return False
            self.note_contact()
            return True
        return False

    def start_watch(self, client: Any, **watch_args: Any) -> "WatchThread":
        """Run :meth:`watch` (with ``watch_args``) on a daemon thread; stop it with ``.stop()``."""
        return WatchThread(self, client, **watch_args)
