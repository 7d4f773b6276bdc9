"""The watch streams of a KeySpace: one :class:`WatchSession` per stream, :class:`WatchThread`.

Owns a stream's life and its contact bookkeeping: who delivers responses into
the KeySpace's queue, when to ask etcd for progress or to probe with a
deadline, and when contact counts as lost (the rules are
:meth:`KeySpace.watch`'s, in ``keyspace.py``). It promises:

* a probe never blocks the pump: probes run on a thread of their own, one at a time;
* nothing is delivered from a session after :meth:`WatchSession.close`;
* :class:`WatchThread` stops within about a second of ``stop()``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .errors import EtcdContactLostError, WatchSilentError, describe
from .key_values import prefix_end

if TYPE_CHECKING:
    from .keyspace import KeySpace

log = logging.getLogger("shmkeyspace.keyspace")


class WatchSession:
    """One watch stream of a KeySpace and the contact bookkeeping of it (see KeySpace.watch).

    Its stream's thread delivers responses into ``q``; :meth:`tick`, called by
    the pump at least every 0.1 s, asks for progress or probes, and reports
    contact lost. Probes run on a thread of their own, one at a time, so a hung
    member never blocks the pump.
    """

    def __init__(
        self,
        ks: "KeySpace",
        client: Any,
        q: "queue.Queue[Any]",
        stale_after: float,
        start: Optional[int] = None,
        watch_silence: Optional[float] = None,
    ) -> None:
        if not stale_after > 0:
            raise ValueError(f"stale_after must be > 0 seconds, got {stale_after!r}")
        #: No delivery at all for this long (ns; 0: no bound) abandons the stream.
        self.silence_ns = int(watch_silence * 1e9) if watch_silence else 0
        self.ks = ks
        #: The revision the stream starts at (None: the KeySpace's header.revision + 1 when opened).
        self.start = start
        self.client = client
        self.q = q
        self.stale_after = stale_after
        self.stale_ns = int(stale_after * 1e9)
        #: Quiet time before asking for progress; a quarter leaves room for a
        #: second request and a probe before stale_after runs out.
        self.tick_ns = max(int(self.stale_ns / 4), 50_000_000)
        self.probe_timeout = max(0.2, min(2.0, stale_after / 2))
        self.opened_ns = time.monotonic_ns()
        self.last_tick_ns = self.opened_ns
        self.delivered_ns = self.opened_ns  # the stream's last response (events or progress)
        self.responses = 0
        self.unanswered = 0  # progress requests sent since the last response
        self.progress = False  # progress requests are sent (and believed answered)
        self.stream: Any = None
        self.watch_id: Any = None
        self._prober: Optional[threading.Thread] = None
        self.closed = False

    def open(self) -> None:
        from . import etcd

        ks = self.ks
        if self.start is None:
            self.start = ks.header.revision + 1
        start = self.start
        if etcd.supports_watch_stream(self.client):
            self.stream = etcd.WatchStream(
                self.client, ks.root_key, prefix_end(ks.root_key) or b"\0", start, self._deliver
            )
            self.progress = self.stream.can_request_progress
        else:  # some other python-etcd3-API client: its own watcher, probes only
            self.watch_id = self.client.add_watch_prefix_callback(
                ks.root_key, self._deliver, start_revision=start, progress_notify=True
            )

    def _deliver(self, item: Any) -> None:
        if self.closed:
            return
        if not isinstance(item, BaseException):
            self.responses += 1
            self.delivered_ns = time.monotonic_ns()
            self.unanswered = 0
            self.ks.note_contact()
        self.q.put(item)

    def tick(self) -> Optional[BaseException]:
        """Ask for progress or probe when quiet; the error to end the stream with, if contact is lost."""
        now = time.monotonic_ns()
        since = max(self.ks.etcd_contact_ns, self.opened_ns)
        if now - since > self.stale_ns:
            return EtcdContactLostError(
                f"no contact with etcd for {(now - since) / 1e9:.1f}s (stale_after {self.stale_after:g}s)"
            )
        if self.silence_ns and now - self.delivered_ns > self.silence_ns:
            return WatchSilentError(
                f"the watch stream delivered nothing, not even a progress notification, for "
                f"{(now - self.delivered_ns) / 1e9:.1f}s (watch_silence {self.silence_ns / 1e9:g}s) while "
                "etcd answered reads: a dead stream behind a gRPC proxy (etcd issue 21813)?"
            )
        if now - since < self.tick_ns or now - self.last_tick_ns < self.tick_ns:
            return None
        self.last_tick_ns = now
        if self.progress:
            if self.unanswered:
                self._start_probe()  # the last request went unanswered: is it the request or etcd?
            self.stream.request_progress()
            self.unanswered += 1
        else:
            self._start_probe()
        return None

    def _start_probe(self) -> None:
        if self._prober is not None and self._prober.is_alive():
            return
        self._prober = threading.Thread(target=self._probe, daemon=True, name="shmkeyspace-probe")
        self._prober.start()

    def _probe(self) -> None:
        from . import etcd

        try:
            if etcd.supports_watch_stream(self.client):
                etcd.probe(self.client, self.ks.root_key, self.probe_timeout)
            else:
                self.client.status()
        except Exception as exc:
            log.debug("etcd probe failed: %s", describe(exc))
            return
        if self.closed:
            return
        self.ks.note_contact()
        if self.progress and self.unanswered >= 2:
            self.progress = False
            log.warning(
                "etcd answers reads but not watch progress requests on this connection (a gRPC "
                "proxy? etcd issue 19710): checking contact with a deadline-bound read instead"
            )

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close()
        elif self.watch_id is not None:
            _cancel(self.client, self.watch_id)


def pump(
    ks: "KeySpace", q: "queue.Queue[Any]", stop: threading.Event, session: WatchSession
) -> Optional[BaseException]:
    """Apply batches from ``q`` to ``ks`` until an error arrives, contact is lost, or ``stop`` is set."""
    while not stop.is_set():
        lost = session.tick()
        if lost is not None:
            return lost
        try:
            first = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(first, BaseException):
            return first
        batch = [first]
        err = None
        deadline = time.monotonic() + ks.watch_apply_delay
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = q.get(timeout=remaining) if remaining > 0 else q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                err = item
                break
            batch.append(item)
        # Eventless answers are contact (counted on arrival), news only when they
        # are progress notifications from a member level with the mirror: a
        # member just failed over to may lag behind it, and etcd's gRPC proxy
        # makes up "created" answers with ClusterId 0 for watches it coalesces.
        rev = ks.header.revision
        batch = [r for r in batch if r.events or is_progress(r, rev)]
        if batch:
            ks.apply(*batch)
        if err is not None:
            return err
    return None


class WatchThread:
    """A KeySpace watch running on its own thread. ``stop()`` returns within ~1 s."""

    def __init__(self, ks: "KeySpace", client: Any, **watch_args: Any) -> None:
        self.keyspace = ks
        self._watch_args = watch_args
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(client,), daemon=True, name=f"shmkeyspace-watch{ks.root}"
        )
        self._thread.start()

    def _run(self, client: Any) -> None:
        try:
            self.keyspace.watch(client, self._stop, **self._watch_args)
        except BaseException as exc:
            self.error = exc
            log.exception("watch of %r stopped on an unrecoverable error", self.keyspace.root)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def is_progress(resp: Any, revision: int) -> bool:
    """An eventless watch response worth applying: a real progress notification at or past ``revision``."""
    hdr = resp.header
    return not getattr(resp, "created", False) and int(hdr.cluster_id) != 0 and int(hdr.revision) >= revision


def _cancel(client: Any, watch_id: Any) -> None:
    # cancel_watch only queues a request; with the stream already gone it may
    # block on a full queue, so it gets a thread of its own.
    t = threading.Thread(target=_quiet_cancel, args=(client, watch_id), daemon=True)
    t.start()
    t.join(0.2)


def _quiet_cancel(client: Any, watch_id: Any) -> None:
    try:
        client.cancel_watch(watch_id)
    except Exception:
        pass
