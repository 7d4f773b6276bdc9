"""What a running Writer reports: read-only facts and the few live settings.

Owns :class:`WriterFacts`, the Writer's properties that read (or set) what its
parts keep: the KeySpace, the UpdatePublisher, the Persister, the Resumer, the
EtcdSession, the Publisher. It promises that each is O(1) and reads one
part's own attribute (``key_count`` takes the KeySpace lock); nothing here
changes behaviour, so the Writer's lifecycle code stays in writer.py. The names
predate the parts, which is why they are kept on the Writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from . import segment

if TYPE_CHECKING:
    from . import state


class WriterFacts:
    """Mixin of :class:`shmkeyspace.writer.Writer`: its read-only facts (see module doc)."""

    keyspace: Any
    publishing: Any
    publisher: Any
    persister: Any
    resumer: Any
    session: Any
    _error: Optional[BaseException]
    _max_image: int

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

    @property
    def source(self) -> str:
        """ "disk" while serving the state file's data not yet caught up, else "etcd" (or "unknown")."""
        return segment.SOURCE_NAMES.get(self.publisher.source, "unknown")

    @property
    def endpoint(self) -> Optional[str]:
        """The etcd endpoint the writer uses now (None with a client passed in)."""
        return self.session.endpoint

    # Counters and state kept by the parts, read here (the names predate the parts).
    @property
    def publications(self) -> int:
        """Publications made (the restored state file's included)."""
        return self.publishing.publications

    @property
    def publish_failures(self) -> int:
        """Publications that failed (logged; retried at the next update or heartbeat)."""
        return self.publishing.publish_failures

    @property
    def last_publish_seconds(self) -> float:
        """Wall time of the last publication (seconds)."""
        return self.publishing.last_publish_seconds

    @property
    def keys_changed(self) -> int:
        """Keys changed by watch updates (metrics)."""
        return self.publishing.keys_changed

    @property
    def full_loads(self) -> int:
        """Full loads from etcd made (the first load, compaction reloads, discarded files)."""
        return self.publishing.full_loads

    @property
    def restored(self) -> Optional[state.StateFile]:
        """The snapshot this writer started from: the state file, or its predecessor's
        image still in shared memory (``path`` then names the segment); None: it
        loaded from etcd."""
        return self.resumer.restored

    @property
    def persist_interval(self) -> float:
        """Seconds between two writes of the state file."""
        return self.persister.interval

    @persist_interval.setter
    def persist_interval(self, seconds: float) -> None:
        self.persister.interval = seconds

    @property
    def persists(self) -> int:
        """State files written (also in the control block, for ``stat`` and readers' Health)."""
        return self.persister.persists

    @property
    def persist_failures(self) -> int:
        """Failures to write the state file (logged; retried next interval)."""
        return self.persister.persist_failures

    @property
    def last_persist_seconds(self) -> float:
        return self.persister.last_persist_seconds

    @property
    def persist_cpu_seconds(self) -> float:
        """CPU seconds spent writing state files (persist thread)."""
        return self.persister.persist_cpu_seconds

    @property
    def capture_cpu_seconds(self) -> float:
        """CPU seconds spent capturing images for state files (publishing thread)."""
        return self.persister.capture_cpu_seconds
