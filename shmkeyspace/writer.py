"""Writer: one process per snapshot name per host that mirrors etcd into shared memory.

Owns a :class:`KeySpace` (load + watch of one prefix), an :class:`ImageBuilder`
kept in step with it, and the :class:`Publisher` of the name. It promises:

* exclusivity: constructing a second Writer for a live name raises
  WriterExistsError naming the running writer's pid;
* every KeySpace update becomes one publication, made as an observer (under the
  KeySpace lock), from per-key packed entries: unchanged entries are never
  repacked;
* values the decoder returns that msgpack cannot serialize are rejected like
  any decode failure (logged, key left out, recoverable);
* a full /dev/shm is logged and the last snapshot stays published; the next
  update retries;
* a heartbeat every ``heartbeat_interval`` seconds, so readers can tell a live
  writer from a dead one.

On exit the segments stay (readers keep the last snapshot and see the writer as
dead; a restarted writer takes over in place) unless ``unlink_on_exit``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from . import segment
from .errors import SegmentFullError
from .key_values import KeyValue
from .keyspace import DEFAULT_APPLY_DELAY, KeySpace
from .snapshot import ImageBuilder, pack_entry

log = logging.getLogger(__name__)


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
    ) -> None:
        if client is None and endpoints is None:
            raise ValueError("Writer needs an etcd client or endpoints")
        self.keyspace = KeySpace(prefix, self._decode)  # validates prefix before any side effect
        self.keyspace.watch_apply_delay = apply_delay
        self.name = segment.validate_name(name)
        self._user_decoder = decoder or (lambda kv: kv.value)
        self._pending: Dict[bytes, Tuple[int, bytes]] = {}
        self._client = client
        self._own_client = client is None
        self._endpoints = endpoints
        self._connect_args = dict(connect_args or {})
        self.publisher = segment.Publisher(name, mode=mode, gid=gid)
        self.publisher.set_heartbeat_interval(heartbeat_interval)
        self.heartbeat_interval = heartbeat_interval
        self.unlink_on_exit = unlink_on_exit
        self.builder = ImageBuilder()
        self.keyspace.observers.append(self._publish)
        #: Publications made, failed, and the wall time of the last one (seconds).
        self.publications = 0
        self.publish_failures = 0
        self.last_publish_seconds = 0.0
        self.loaded = threading.Event()
        self._stop = threading.Event()
        self._threads: list = []
        self._closed = False

    # -- decode + pack ------------------------------------------------------------
    def _decode(self, kv: KeyValue) -> Any:
        decoded = self._user_decoder(kv)
        # Packing here makes "not msgpack-serializable" a decode failure, and the
        # packed bytes are reused by _publish instead of packing twice.
        packed = pack_entry(kv.key, decoded, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
        self._pending[kv.key] = (kv.mod_revision, packed)
        return decoded

    def _packed(self, kv: KeyValue) -> bytes:
        p = self._pending.get(kv.key)
        if p is not None and p[0] == kv.mod_revision:
            return p[1]
        return pack_entry(kv.key, kv.decoded, kv.create_revision, kv.mod_revision, kv.version, kv.lease)

    # -- publishing (KeySpace observer: runs with keyspace.lock held) --------------
    def _publish(self) -> None:
        if self._closed:
            # stop() ran while a watch batch was in flight (run() on a thread that
            # stop() does not join, or a join that timed out): publishing now
            # would recreate segments of a closed Publisher.
            self._pending = {}
            return
        t0 = time.perf_counter()
        ks = self.keyspace
        rev = ks.header.revision
        changed = ks.changed_keys
        try:
            if changed is None:
                self.builder.reset(((kv.key, self._packed(kv)) for kv in ks.key_values), rev)
            else:
                kvs = ks.key_values
                changes = {}
                for k in changed:
                    kv = kvs.get(k)
                    changes[k] = None if kv is None else self._packed(kv)
                self.builder.apply(changes, rev)
        finally:
            self._pending = {}
        parts, total = self.builder.parts()
        try:
            self.publisher.publish(parts, total, rev, len(self.builder), stable=self.builder.stable_span())
        except SegmentFullError as exc:
            self.publish_failures += 1
            log.error("publication of %r at revision %d failed: %s", self.name, rev, exc)
            return
        self.publications += 1
        self.last_publish_seconds = time.perf_counter() - t0
        log.debug(
            "published %r revision %d: %d keys, %d bytes in %.2f ms",
            self.name,
            rev,
            len(self.builder),
            total,
            self.last_publish_seconds * 1e3,
        )

    # -- running --------------------------------------------------------------------
    def connect(self) -> Any:
        if self._client is None:
            from .etcd import connect

            self._client = connect(self._endpoints or "", **self._connect_args)
        return self._client

    def load(self) -> None:
        """Connect if needed and load the prefix (logging progress for big ones)."""
        client = self.connect()
        t0 = time.monotonic()
        last = [t0]

        def progress(n: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                log.info("loading %r: %d keys so far", self.keyspace.root, n)

        self.keyspace.load(client, progress=progress)
        log.info(
            "loaded %r at revision %d: %d keys in %.2fs; published as %r",
            self.keyspace.root,
            self.keyspace.header.revision,
            len(self.keyspace.key_values),
            time.monotonic() - t0,
            self.name,
        )
        self.loaded.set()

    def run(self) -> None:
        """Load, then watch until :meth:`stop`. Blocks."""
        hb = threading.Thread(target=self._heartbeat, daemon=True, name="shmkeyspace-heartbeat")
        hb.start()
        self._threads.append(hb)
        try:
            if not self.loaded.is_set():
                self.load()
            self.keyspace.watch(self._client, self._stop)
        finally:
            self._stop.set()

    def start(self) -> "Writer":
        """Run in a background thread; returns once the first snapshot is published."""
        self.load()
        t = threading.Thread(target=self._run_quietly, daemon=True, name="shmkeyspace-writer")
        t.start()
        self._threads.append(t)
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("writer %r stopped on an unrecoverable error", self.name)

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            if self.publisher.ctrl is None:
                return
            self.publisher.heartbeat(self.keyspace.etcd_revision)
            self._stop.wait(self.heartbeat_interval)

    def stop(self) -> None:
        """Stop watching, release the writer lock (and unlink if asked). Idempotent."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)
        if self._closed:
            return
        self._closed = True
        with self.keyspace.lock:
            self.publisher.close(unlink=self.unlink_on_exit)
        if self._own_client and self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass

    close = stop

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
