"""Prometheus metrics for the writer and for the readers' view (``prometheus_client``).

Owns two collectors; both compute their values at scrape time from state that
exists anyway (writer counters, the control block, ``Reader.health``), so metrics
cost nothing between scrapes except one histogram observation per publication.

* :class:`WriterCollector` — what ``shmkeyspace writer --metrics-port PORT``
  serves (:func:`serve_writer_metrics`): published and etcd revisions, lag,
  seconds since the last contact with etcd, publications and failures, a publish
  duration histogram, watch events applied, decode failures, reloads, keys, bytes.
* :class:`ReaderCollector` — for applications (gunicorn workers, ...) that export
  what their Reader sees: revision, heartbeat age, writer alive, lag, keys, bytes.
  It opens its own Reader on first scrape, so a scrape on the exporter's thread
  never races the application's Reader (Readers are not for concurrent use)::

      from prometheus_client import REGISTRY
      from shmkeyspace.metrics import ReaderCollector
      REGISTRY.register(ReaderCollector("services"))

Needs the ``metrics`` extra (``pip install shmkeyspace[metrics]``). Every metric
carries a ``name`` label: the snapshot name.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, Tuple, Union

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import segment
from .errors import ShmKeyspaceError

if TYPE_CHECKING:  # pragma: no cover
    from .publish import PublishStats
    from .writer import Writer

log = logging.getLogger(__name__)


class HealthSource(Protocol):
    """What :class:`ReaderCollector` needs of the Reader it opens."""

    def health(self, stale_after: Optional[float] = None) -> Any: ...

    def close(self) -> None: ...


#: Control-block word holding CLOCK_MONOTONIC ns of the writer's last contact with
#: etcd (written by writers that track contact; 0 or absent = unknown).
_OFF_CONTACT = getattr(segment, "OFF_CONTACT", 192)

#: Publish durations: a 1-key publish at 100k keys takes ~1 ms, a full reload ~0.1-1 s.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _gauge(name: str, doc: str, label: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["name"])
    g.add_metric([label], value)
    return g


def _counter(name: str, doc: str, label: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["name"])
    c.add_metric([label], value)
    return c


class WriterCollector(Collector):
    """Metrics of one in-process :class:`Writer` (see module doc)."""

    def __init__(self, writer: "Writer", registry: Optional[CollectorRegistry] = None) -> None:
        self.writer = writer
        self._ctrl: Optional[segment.ControlView] = None
        self.publish_seconds = Histogram(
            "shmkeyspace_writer_publish_seconds",
            "Wall time of one publication (update applied to the image, copied, published).",
            ["name"],
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        ).labels(writer.name)
        writer.add_publish_observer(self._observe)

    def _observe(self, stats: PublishStats) -> None:
        # wall_total: the publication's wall time, what Writer.last_publish_seconds holds.
        self.publish_seconds.observe(stats.wall_total / 1e9)

    def _control(self) -> Optional[segment.ControlView]:
        if self._ctrl is None:
            try:
                self._ctrl = segment.ControlView(self.writer.name)
            except (ShmKeyspaceError, OSError):
                return None
        return self._ctrl

    def _published(self) -> Tuple[int, int, int]:
        """(revision, keys, image bytes) of the current publication, from the control block."""
        ctrl = self._control()
        if ctrl is None:
            return 0, 0, 0
        for _ in range(100):
            s1 = ctrl.words[segment.OFF_SEQ // 8]
            if s1 < 2:
                return 0, 0, 0
            rec = ctrl.record((s1 >> 1) & 1)
            if ctrl.words[segment.OFF_SEQ // 8] - (s1 & ~1) <= 2:
                return rec[4], rec[5], rec[3]
        return 0, 0, 0

    def contact_age(self) -> float:
        """Seconds since the writer last heard from etcd (0 when not tracked)."""
        ctrl = self._control()
        if ctrl is None:
            return 0.0
        ns = ctrl.words[_OFF_CONTACT // 8]
        return max(0.0, (time.monotonic_ns() - ns) / 1e9) if ns else 0.0

    def collect(self) -> Iterator[Any]:
        w = self.writer
        n = w.name
        rev, keys, nbytes = self._published()
        etcd_rev = w.keyspace.etcd_revision
        yield _gauge("shmkeyspace_writer_published_revision", "Revision of the published snapshot.", n, rev)
        yield _gauge(
            "shmkeyspace_writer_etcd_revision", "Newest etcd revision the writer has heard of.", n, etcd_rev
        )
        yield _gauge(
            "shmkeyspace_writer_lag_revisions",
            "etcd revision minus published revision (0 when idle).",
            n,
            max(0, etcd_rev - rev) if rev else 0,
        )
        yield _gauge(
            "shmkeyspace_writer_etcd_contact_age_seconds",
            "Seconds since the writer last heard from etcd (0: not tracked).",
            n,
            self.contact_age(),
        )
        yield _counter("shmkeyspace_writer_publications", "Snapshots published.", n, w.publications)
        yield _counter(
            "shmkeyspace_writer_publish_failures",
            "Publications that failed (shared memory full).",
            n,
            w.publish_failures,
        )
        yield _counter(
            "shmkeyspace_writer_events_applied",
            "Keys changed by watch events applied to the mirror.",
            n,
            w.keys_changed,
        )
        yield _counter(
            "shmkeyspace_writer_decode_failures", "Values the decoder rejected.", n, w.decode_failures
        )
        yield _counter(
            "shmkeyspace_writer_reloads",
            "Full loads from etcd after the first snapshot (compaction, a discarded state file).",
            n,
            max(0, w.full_loads - (0 if w.restored is not None else 1)),
        )
        yield _counter("shmkeyspace_writer_persists", "State files written (fail static).", n, w.persists)
        yield _counter(
            "shmkeyspace_writer_persist_failures",
            "State files that could not be written (disk full, permissions; retried next interval).",
            n,
            w.persist_failures,
        )
        yield _gauge(
            "shmkeyspace_writer_history_epoch",
            "Raised when a full load follows a reset etcd history (revisions compare within one epoch).",
            n,
            w.publisher.epoch,
        )
        ls = w.load_status
        yield _gauge(
            "shmkeyspace_writer_loading",
            "1 while a full load runs or waits to retry (a slow page, a failed load), else 0.",
            n,
            0 if ls.state == "idle" else 1,
        )
        yield _counter(
            "shmkeyspace_writer_load_page_retries",
            "Range pages of full loads asked again (smaller, same revision) after a timeout.",
            n,
            ls.page_retries,
        )
        yield _counter(
            "shmkeyspace_writer_load_restarts",
            "Full loads started again from the first key after a failure (jittered backoff).",
            n,
            ls.restarts,
        )
        yield _gauge("shmkeyspace_writer_keys", "Keys in the published snapshot.", n, keys)
        yield _gauge("shmkeyspace_writer_bytes", "Bytes of the published snapshot image.", n, nbytes)
        groups = w.prefix_bytes()
        if groups is not None:  # --account-depth: per prefix, the largest 100 and "(other)"
            gk = GaugeMetricFamily(
                "shmkeyspace_writer_prefix_keys",
                "Keys per prefix (--account-depth).",
                labels=["name", "prefix"],
            )
            gb = GaugeMetricFamily(
                "shmkeyspace_writer_prefix_bytes",
                "Bytes of packed entries per prefix (--account-depth; after any --transform).",
                labels=["name", "prefix"],
            )
            for prefix, k, b in groups:
                gk.add_metric([n, prefix], k)
                gb.add_metric([n, prefix], b)
            yield gk
            yield gb

    def close(self) -> None:
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None


def serve_writer_metrics(
    writer: "Writer", port: int, addr: str = "127.0.0.1"
) -> Tuple[Any, CollectorRegistry]:
    """Serve ``writer``'s metrics at ``http://addr:port/metrics`` from a daemon thread.

    Returns (the HTTP server, its registry); ``server.shutdown()`` stops it.
    """
    registry = CollectorRegistry()
    collector = WriterCollector(writer, registry)
    registry.register(collector)
    server, _thread = start_http_server(port, addr, registry=registry)
    log.info("metrics of %r at http://%s:%d/metrics", writer.name, addr, port)
    return server, registry


class ReaderCollector(Collector):
    """What a Reader of snapshot ``name`` sees (see module doc). Thread-safe to scrape.

    ``stale_after`` is passed to :meth:`Reader.health`, ``writer_uid`` to the Reader. A snapshot that does not
    exist (yet) exports ``shmkeyspace_reader_writer_alive 0`` and nothing else.
    """

    def __init__(
        self, name: str, stale_after: Optional[float] = None, writer_uid: Union[int, str, None] = None
    ) -> None:
        self.name = segment.validate_name(name)
        self.writer_uid = writer_uid
        self.stale_after = stale_after
        self._reader: Optional[HealthSource] = None
        import threading

        self._lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        n = self.name
        with self._lock:
            try:
                if self._reader is None:
                    # The one use of the reader module, at run time: this collector
                    # sits above it (it opens a Reader); reader.py never imports metrics.
                    from .reader import Reader

                    self._reader = Reader(n, cache_size=0, writer_uid=self.writer_uid)
                h = self._reader.health(self.stale_after)
            except (ShmKeyspaceError, OSError) as exc:
                log.debug("reader metrics of %r unavailable: %s", n, exc)
                yield _gauge("shmkeyspace_reader_writer_alive", "1 if the writer is alive.", n, 0)
                return
        yield _gauge(
            "shmkeyspace_reader_writer_alive", "1 if the writer is alive.", n, 1 if h.writer_alive else 0
        )
        yield _gauge("shmkeyspace_reader_revision", "Revision of the snapshot readers see.", n, h.revision)
        yield _gauge(
            "shmkeyspace_reader_heartbeat_age_seconds",
            "Seconds since the writer's last heartbeat (-1: never).",
            n,
            -1 if h.heartbeat_age is None else h.heartbeat_age,
        )
        yield _gauge("shmkeyspace_reader_lag_revisions", "etcd revision minus published revision.", n, h.lag)
        yield _gauge("shmkeyspace_reader_keys", "Keys in the published snapshot.", n, h.keys)
        yield _gauge(
            "shmkeyspace_reader_history_epoch",
            "History epoch of the snapshot read (a reset etcd history raises it).",
            n,
            h.epoch,
        )
        yield _gauge(
            "shmkeyspace_reader_persist_failures",
            "State files the writer failed to write (fail static).",
            n,
            h.persist_failures,
        )
        yield _gauge("shmkeyspace_reader_bytes", "Bytes of the published snapshot image.", n, h.bytes)
        # Fields other work adds to Health (contact tracking, fail static), when present.
        contact = getattr(h, "etcd_contact_age", None)
        if contact is not None:
            yield _gauge(
                "shmkeyspace_reader_etcd_contact_age_seconds",
                "Seconds since the writer last heard from etcd.",
                n,
                contact,
            )
        stale = getattr(h, "stale", None)
        if stale is not None:
            yield _gauge(
                "shmkeyspace_reader_stale",
                "1 if the writer says its data may be stale.",
                n,
                1 if stale else 0,
            )

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
