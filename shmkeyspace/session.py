"""The writer's etcd session: one client, and failover across its endpoints.

Owns the etcd client a :class:`Writer` uses (the one passed in, or one it
connects to itself through :class:`shmkeyspace.etcd.Failover`). It promises:

* :meth:`EtcdSession.connect` connects once, on first use, whichever thread asks
  first (the probe thread of a resume and the main thread may race), and returns
  the same client afterwards;
* a hung member does not hold a failover up for long: each member is probed for
  at most half of ``stale_after`` (at least 1 s), reading the prefix's own key
  (a user limited to the prefix may read it);
* :meth:`EtcdSession.reconnect` moves to the next endpoint that answers, for a
  watch that lost its member; a client passed in is never replaced;
* :meth:`EtcdSession.close` closes what the session opened, never a client
  passed in.

Locking: ``_connect_lock`` guards the first connection (:meth:`connect`);
:meth:`reconnect` runs only on the watch's thread, after the first connection.
grpc is imported only when the session connects (``etcd.py``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


class EtcdSession:
    """The etcd client of writer ``name``: ``client`` as given, or one connected to ``endpoints``."""

    def __init__(
        self,
        name: str,
        client: Any,
        endpoints: Optional[str],
        connect_args: Dict[str, Any],
        stale_after: float,
        probe_key: bytes,
    ) -> None:
        self.name = name
        self._client = client
        self._own_client = client is None
        self._endpoints = endpoints
        self._connect_args = dict(connect_args)
        self._stale_after = stale_after
        self._probe_key = probe_key
        self._failover: Any = None  # etcd.Failover over the endpoints, when we own the client
        self._connect_lock = threading.Lock()

    def connect(self) -> Any:
        """The client, connected on the first call (blocks while no endpoint answers)."""
        with self._connect_lock:  # the probe thread and the main thread may both ask first
            return self._connect()

    def _connect(self) -> Any:
        if self._client is None:
            from .etcd import Failover

            # Half of stale_after per member probed: a healthy member answers in
            # milliseconds, a hung one must not hold the failover up for long.
            probe_timeout = min(self._connect_args.get("timeout") or 10.0, max(1.0, self._stale_after / 2))
            # The probe reads the prefix's own key: a user limited to the prefix may read it.
            self._failover = Failover(
                self._endpoints or "",
                probe_timeout=probe_timeout,
                probe_key=self._probe_key,
                **self._connect_args,
            )
            self._client = self._failover.connect()
        return self._client

    @property
    def fails_over(self) -> bool:
        """True if :meth:`reconnect` can move to another endpoint (the session connected itself)."""
        return self._failover is not None

    def reconnect(self) -> Any:
        """The watch lost its member: move on to the next endpoint that answers."""
        self._client = self._failover.next()
        log.info("etcd: %r now follows %s", self.name, self._failover.endpoint)
        return self._client

    @property
    def endpoint(self) -> Optional[str]:
        """The etcd endpoint in use now (None with a client passed in)."""
        return self._failover.endpoint if self._failover is not None else None

    def close(self) -> None:
        """Close the failover or the client this session opened (a client passed in stays open)."""
        if self._failover is not None:
            self._failover.close()
        elif self._own_client and self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
