"""Consistent reads: ``Reader.sync()``, both halves of the sync protocol.

Read-your-writes across processes without a watch per process (the idea of
Kubernetes' consistent reads from cache, KEP-2340): a reader asks the writer;
the writer reads etcd's revision R linearizably, *after* the request arrived,
and answers once its published snapshot holds every change under the prefix
up to R: when the snapshot's revision passes R (a write under the prefix), or
else, after twice the apply delay, when it matches the number of keys and the
greatest mod_revision under the prefix at R (writes elsewhere raised R).
Every change under the prefix committed before ``sync()`` was called is then
in what the reader's next query sees.

Why not a watch progress notification, as Kubernetes does: etcd before 3.5.8
and 3.4.24 may send one ahead of events still queued for the stream (etcd
issue 15220; the etcd of the tests, 3.5.1, did so in tests/test_sync.py). The
count and the newest mod_revision at R need no such promise: the snapshot is
current through R when its revision passed R, or reached that newest
mod_revision with as many keys (published plus left out) as etcd counts, since
after it only deletions can have happened, each lowering the count. The cost
is etcd's: a point read per round, and when R came from writes elsewhere, two
Range requests that walk the prefix (count, and the newest key by
mod_revision), O(keys under the prefix) on the server.

The protocol, one Unix stream socket per name at :func:`socket_path`
(``/dev/shm/.shmks.NAME.sync``, created by the writer, owned by its uid; the
segments' group, if any, may connect)::

    request   1 byte  b"S"
    answer    1 byte  status (0 ok, 1 error), u64 LE revision, then until the
              writer closes: a UTF-8 message (why, for an error)

Owns :class:`SyncServer` (the writer's half: one thread accepting, one
answering rounds) and :func:`request` / :func:`request_async` (the readers').
Promises:

* an answer's revision R comes from a linearizable read that started after the
  request was received (requests that arrive during a round wait for the next
  one), and the answer is sent only once the published snapshot holds every
  change under the prefix up to R;
* one round serves every request waiting when it starts (one pair of etcd reads
  for any number of readers), and a reader can make the writer do nothing else:
  no request touches the apply path, the KeySpace lock is taken only to read
  three numbers, and at most :data:`MAX_PENDING` connections wait;
* readers trust the socket only when its owner is the snapshot's (trust.py's
  rule for segments); every failure is a :class:`SyncError` naming the cause.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from .errors import SyncError, SyncTimeoutError, UntrustedSegmentError

log = logging.getLogger(__name__)

_ANSWER = struct.Struct("<BQ")
MAX_PENDING = 4096


def socket_path(name: str) -> str:
    """Where the writer of ``name`` answers sync requests."""
    return f"/dev/shm/.shmks.{name}.sync"


# -- the writer's half -------------------------------------------------------------------
class SyncServer:
    """Answers sync requests for the writer of ``name`` (see module doc).

    ``read_revision()``: etcd's current revision R by a linearizable point read
    (raises when etcd does not answer); ``read_state(R)``: ``(keys, newest
    mod_revision)`` under the prefix at R (:func:`etcd_state`, O(keys) in etcd);
    ``reached((R, keys, top))``: whether the published snapshot holds every
    change up to R (:func:`reached`; None while it cannot say). A round first
    waits ``quick`` seconds for the snapshot's revision to pass R (what a write
    under the prefix brings, after the apply delay), and only then pays for
    ``read_state``: writes elsewhere in etcd raise R without changing the
    prefix. ``timeout``: how long a round waits in all. Threads: its own two;
    :meth:`close` joins them and removes the socket.
    """

    def __init__(
        self,
        name: str,
        read_revision: Callable[[], int],
        read_state: Callable[[int], Tuple[int, int]],
        reached: Callable[[Tuple[int, Optional[int], int]], Optional[bool]],
        mode: int = 0o600,
        gid: Optional[int] = None,
        timeout: float = 10.0,
        quick: float = 0.1,
    ) -> None:
        self.path = socket_path(name)
        self._read_revision = read_revision
        self._read_state = read_state
        self._reached = reached
        self._timeout = timeout
        self._quick = quick
        self._pending: List[socket.socket] = []
        self._cv = threading.Condition()
        self._closed = False
        #: Rounds answered, and requests served (tests, metrics).
        self.rounds = 0
        self.served = 0
        try:
            os.unlink(self.path)  # a predecessor's: the caller holds the writer lock
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(self.path)
        finally:
            os.umask(old)
        # Connecting takes write permission: whoever may read the segments may ask.
        os.chmod(self.path, (mode & 0o440) | ((mode & 0o440) >> 1))
        if gid is not None:
            os.chown(self.path, -1, gid)
        self._ino = os.stat(self.path).st_ino
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self._threads = [
            threading.Thread(target=self._accept, daemon=True, name=f"shmkeyspace-sync-accept-{name}"),
            threading.Thread(target=self._serve, daemon=True, name=f"shmkeyspace-sync-{name}"),
        ]
        for t in self._threads:
            t.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            conn.settimeout(1.0)
            try:
                ok = conn.recv(1) == b"S"
            except OSError:
                ok = False
            with self._cv:
                if not ok or len(self._pending) >= MAX_PENDING:
                    conn.close()
                    continue
                self._pending.append(conn)
                self._cv.notify()

    def _serve(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                batch, self._pending = self._pending, []
            status, rev, msg = self._round()
            self.rounds += 1
            self.served += len(batch)
            answer = _ANSWER.pack(status, rev) + msg.encode()
            for conn in batch:
                try:
                    conn.sendall(answer)
                except OSError:
                    pass  # the reader gave up
                finally:
                    conn.close()

    def _round(self) -> Tuple[int, int, str]:
        try:
            rev = int(self._read_revision())
        except Exception as exc:
            return 1, 0, f"etcd did not answer the writer's linearizable read: {exc}"
        t0 = time.monotonic()
        deadline = t0 + self._timeout
        target: Tuple[int, Optional[int], int] = (rev, None, 0)  # revision only, at first
        while True:
            ok = self._reached(target)
            if ok:
                return 0, rev, ""
            now = time.monotonic()
            if target[1] is None and now - t0 >= self._quick:
                try:
                    target = (rev, *self._read_state(rev))
                except Exception as exc:
                    return 1, rev, f"etcd did not answer the writer's read of the prefix at {rev}: {exc}"
                continue
            if now >= deadline:
                why = (
                    "its publications are failing or it has not caught up since a restart"
                    if ok is None
                    else "its watch has not delivered the changes yet"
                )
                return (
                    1,
                    rev,
                    f"the writer did not get current through etcd revision {rev} in {self._timeout:g}s: {why}",
                )
            time.sleep(0.001)

    def close(self) -> None:
        """Stop answering; waiting readers get an error; the socket file goes (if still ours)."""
        with self._cv:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cv.notify_all()
        for conn in pending:
            try:
                conn.sendall(_ANSWER.pack(1, 0) + b"the writer is stopping")
            except OSError:
                pass
            conn.close()
        self._sock.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def etcd_revision(client: Any, root: bytes) -> int:
    """etcd's current revision: the header of a linearizable point read of ``root``. O(1)."""
    return int(client.get_response(root).header.revision)


def etcd_state(client: Any, root: bytes, rev: int) -> Tuple[int, int]:
    """``(keys, newest mod_revision)`` under ``root`` at revision ``rev`` (the module doc says
    why these). Two Range requests, each O(keys under root) in etcd."""
    from .key_values import prefix_end

    end = prefix_end(root) or b"\0"
    count = int(client.get_range_response(root, end, count_only=True, revision=rev).count)
    top = client.get_range_response(
        root, end, limit=1, sort_order="descend", sort_target="mod", keys_only=True, revision=rev
    )
    return count, int(top.kvs[0].mod_revision) if top.kvs else 0


def reached(
    keyspace: Any, publishing: Any, publisher: Any, target: Tuple[int, Optional[int], int]
) -> Optional[bool]:
    """Whether the writer's published snapshot holds every change under the prefix up to
    ``target = (R, keys, top)`` (keys None: only its revision passing R counts); None
    while it cannot say (a publication failing, or not caught up with etcd since a
    restart). O(1); takes ``keyspace.lock``."""
    from . import segment

    rev, count, top = target
    with keyspace.lock:
        # Read under the lock apply() holds through its publication: what is seen
        # here was applied and published.
        if publishing.unpublished or publisher.source != segment.SOURCE_ETCD:
            return None
        mine = keyspace.header.revision
        # Past rev: every event up to rev was delivered in order and applied. At or
        # past top with etcd's count: only deletions can follow top, each one
        # lowering the count, so none is missing.
        if mine >= rev:
            return True
        return (
            count is not None
            and mine >= top
            and len(keyspace.key_values) + publishing.excluded_count == count
        )


# -- the readers' half ---------------------------------------------------------------------
def _check_owner(name: str, path: str, owner_uid: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SyncError(
            f"no writer answers sync requests for {name!r} (not running, or one older than sync: {path} is missing)"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedSegmentError(f"{path} is not a socket")
    if st.st_uid != owner_uid:
        raise UntrustedSegmentError(
            f"{path} belongs to uid {st.st_uid}, not to the snapshot's writer (uid {owner_uid}): not asked"
        )


def _parse(name: str, data: bytes) -> int:
    if len(data) < _ANSWER.size:
        raise SyncError(f"the writer of {name!r} closed the sync connection without an answer")
    status, rev = _ANSWER.unpack_from(data)
    if status != 0:
        raise SyncError(f"sync of {name!r} failed: {data[_ANSWER.size :].decode(errors='replace')}")
    return rev


def request(name: str, owner_uid: int, timeout: float) -> int:
    """Ask the writer of ``name``; returns the etcd revision its published snapshot is now current through.

    Raises SyncTimeoutError after ``timeout`` seconds, SyncError for anything the
    writer reports (etcd unreachable, ...) or no writer listening. O(1 round trip
    to the writer + its round: two Range requests to etcd, then the apply delay).
    """
    path = socket_path(name)
    _check_owner(name, path, owner_uid)
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(b"S")
            data = b""
            while True:
                s.settimeout(max(0.0, deadline - time.monotonic()) or 1e-6)
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise SyncTimeoutError(f"sync of {name!r}: no answer from its writer in {timeout:g}s") from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise SyncError(f"no writer answers sync requests for {name!r} (not running?)") from None
    finally:
        s.close()
    return _parse(name, data)


async def request_async(name: str, owner_uid: int, timeout: float) -> int:
    """:func:`request` for asyncio: no thread, the event loop waits on the socket."""
    path = socket_path(name)
    _check_owner(name, path, owner_uid)

    async def ask() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b"S")
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    try:
        data = await asyncio.wait_for(ask(), timeout)
    except asyncio.TimeoutError:
        raise SyncTimeoutError(f"sync of {name!r}: no answer from its writer in {timeout:g}s") from None
    except (ConnectionRefusedError, FileNotFoundError):
        raise SyncError(f"no writer answers sync requests for {name!r} (not running?)") from None
    return _parse(name, data)
