"""The full load of a KeySpace: every key under its root at one revision.

Owns how a load reads etcd: etcd 3.7's streamed Range (``RangeStream``) when the
server has it, else few, large Range pages, and what happens when a page is
slow or refused. It promises:

* a consistent cut: every key comes from one revision (the one asked, or the
  first answer's), streamed or paged, retried or not;
* a slow page never restarts the load: a page that times out (or finds etcd
  unavailable) is asked again from the same key at the same revision with half
  the keys, after a jittered backoff, up to PAGE_TRIES times; only then does
  the load fail (:class:`~shmkeyspace.errors.LoadFailedError`) and the caller
  starts it again. A stream that breaks or stalls goes on as pages from the
  key after the last one it delivered, at the stream's revision;
* a page over the client's gRPC receive limit (RESOURCE_EXHAUSTED) is halved
  until it fits, and later pages are sized by what fitted (not counted as tries);
* a server without ``RangeStream`` (etcd < 3.7, the gRPC proxy) answers
  UNIMPLEMENTED at once: the load falls back to pages and that client is not
  asked again;
* the caller sees progress and trouble as it happens (:class:`LoadStatus`).

Only :mod:`shmkeyspace.etcd` touches grpc; this module sees the client and
its errors duck-typed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Set, Tuple

from .errors import LoadFailedError, describe
from .key_values import KeyValue, prefix_end

if TYPE_CHECKING:
    from .keyspace import Header, KeySpace

log = logging.getLogger(__name__)

#: Keys of the first Range page of a load. Later pages are sized by bytes
#: (PAGE_BYTES over the bytes per key seen so far): etcd 3.5 walks the rest of
#: the range to count it on every limited page, so small pages make a load
#: quadratic (measured, 1M keys: 5k-key pages 33.8 s, 100k-key pages 4.1 s).
FIRST_PAGE = 10_000
#: Target bytes per Range page: half the writer's gRPC receive limit (64 MiB,
#: shmkeyspace.etcd.GRPC_OPTIONS); ~150k keys of ~110 B values. A page over a
#: client's limit fails RESOURCE_EXHAUSTED: it is halved and retried, and the
#: byte budget shrinks with it.
PAGE_BYTES = 32 << 20
#: A page that times out is asked again with half the keys, but not fewer than this.
MIN_TIMEOUT_PAGE = 1000
#: Tries of one page (timeouts, etcd unavailable) before the load fails.
PAGE_TRIES = 6
#: Backoff before the second try of a page, doubled for each later one (jittered
#: to 50-100 %, capped at PAGE_BACKOFF_MAX). Its low end (0.25 s) is more than
#: pyetcd's time_retry (0.2 s, etcd.connect): a member that timed out is refused that long.
PAGE_BACKOFF = 0.5
PAGE_BACKOFF_MAX = 5.0


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1``: ``base * 2**(attempt - 1)``, capped, jittered.

    The jitter (a uniform 50-100 % of the step) keeps many clients that failed
    together (a fleet restarting at once) from coming back together.
    """
    step = min(cap, base * (2 ** max(0, attempt - 1)))
    return step * random.uniform(0.5, 1.0)


class LoadStatus:
    """What a KeySpace's loads are doing, for the writer's ``stat`` and metrics.

    ``state`` is "idle" (no load running), "loading" (reading etcd) or "waiting"
    (a backoff: before a page's next try, or before the load starts again).
    Counters are cumulative over the KeySpace's life. Plain attributes written
    by the loading thread; a reader on another thread may see them one step
    behind (each is one store).
    """

    def __init__(self) -> None:
        self.state = "idle"
        #: Keys read so far by the load running (or the last one).
        self.keys = 0
        #: Pages asked again after a timeout or an unavailable etcd.
        self.page_retries = 0
        #: Loads started again from the first key (counted by the caller: the writer).
        self.restarts = 0
        #: True when the last load read etcd's RangeStream (etcd >= 3.7).
        self.streamed = False
        #: Why the last page try or load failed ("" if none did).
        self.last_error = ""


def _code_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    try:
        return str(getattr(code(), "name", "")) if callable(code) else ""
    except Exception:
        return ""


def _is_timeout(exc: BaseException) -> bool:
    # grpc's DEADLINE_EXCEEDED, or the client library's own wrapper of it.
    return _code_name(exc) == "DEADLINE_EXCEEDED" or "Timeout" in type(exc).__name__


def _is_unavailable(exc: BaseException) -> bool:
    # NoServerAvailableError: pyetcd marks an endpoint failed for a while after a
    # timeout and refuses calls meanwhile; a retry after the backoff may find it back
    # (tests/test_load.py hit it when the retry came inside that window).
    return _code_name(exc) == "UNAVAILABLE" or type(exc).__name__ in (
        "ConnectionFailedError",
        "ConnectionError",
        "NoServerAvailableError",
    )


def range_page(
    client: Any,
    start: bytes,
    end: bytes,
    limit: int,
    rev: int,
    status: Optional[LoadStatus] = None,
    stop: Optional[threading.Event] = None,
    loaded: int = 0,
) -> Tuple[Any, int]:
    """One Range page of at most ``limit`` keys from ``start`` at revision ``rev``.

    Returns the response and the limit finally asked. Too big for the gRPC
    receive limit: halved until it fits. A timeout or an unavailable etcd: the
    same page (same start, same revision) is asked again with half the keys
    (not fewer than MIN_TIMEOUT_PAGE) after :func:`backoff`, up to PAGE_TRIES
    tries in all; then :class:`LoadFailedError`. Anything else raises at once
    (a compacted revision: the load must start again at a new one).
    """
    tries = 0
    while True:
        try:
            return client.get_range_response(start, end, limit=limit, revision=rev or None), limit
        except Exception as exc:
            if _code_name(exc) == "RESOURCE_EXHAUSTED" and limit > 1:
                limit = max(1, limit // 2)
                log.info("etcd page too large for the gRPC receive limit: retrying with %d keys", limit)
                continue
            if not (_is_timeout(exc) or _is_unavailable(exc)):
                raise
            tries += 1
            if status is not None:
                status.last_error = describe(exc)
            if tries >= PAGE_TRIES or (stop is not None and stop.is_set()):
                raise LoadFailedError(
                    f"etcd Range page from key {start!r} at revision {rev} failed {tries} times "
                    f"({describe(exc)}) after {loaded} keys",
                    exc,
                    loaded,
                ) from exc
            if _is_timeout(exc) and limit > MIN_TIMEOUT_PAGE:
                limit = max(MIN_TIMEOUT_PAGE, limit // 2)
            wait = backoff(tries, PAGE_BACKOFF, PAGE_BACKOFF_MAX)
            log.warning(
                "etcd page from %r at revision %d failed (%s): try %d of %d with %d keys in %.2fs",
                start,
                rev,
                describe(exc),
                tries + 1,
                PAGE_TRIES,
                limit,
                wait,
            )
            if status is not None:
                status.page_retries += 1
                status.state = "waiting"
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            if status is not None:
                status.state = "loading"


class _Prefetch:
    """A Range page fetched on a thread of its own; :meth:`result` joins it."""

    def __init__(self, *args: Any) -> None:
        self._out: Optional[Tuple[Any, int]] = None
        self._err: Optional[BaseException] = None
        self._t = threading.Thread(target=self._run, args=args, daemon=True, name="shmkeyspace-page")
        self._t.start()

    def _run(self, *args: Any) -> None:
        try:
            self._out = range_page(*args)
        except BaseException as exc:
            self._err = exc

    def result(self) -> Tuple[Any, int]:
        self._t.join()
        if self._err is not None:
            raise self._err
        assert self._out is not None
        return self._out


class _Sink:
    """Decodes a load's KeyValues into the KeySpace's store loader, in key order."""

    def __init__(self, ks: "KeySpace", status: LoadStatus, progress: Optional[Callable[[int], None]]) -> None:
        self.loader = ks.new_loader()
        self.excluded: Set[bytes] = set()
        self.decode = ks.decode_raw
        self.n = 0
        self.last_key = b""
        self.status = status
        self.progress = progress

    def add(self, kvs: Any) -> None:
        loader, excluded = self.loader, self.excluded
        add_page = getattr(loader, "add_page", None)
        left = None if add_page is None else add_page(kvs, self._decode_one)
        if left is not None:  # the writer's compiled decode + pack took the page
            excluded.update(left)
        else:
            decode_one = self._decode_one
            for kv in kvs:
                dec = decode_one(kv)
                if dec is None:
                    excluded.add(bytes(kv.key))
                else:
                    loader.add(dec)
        if kvs:
            self.last_key = bytes(kvs[-1].key)
        self.n += len(kvs)
        self.status.keys = self.n
        if self.progress is not None:
            self.progress(self.n)

    def _decode_one(self, kv: Any) -> Optional[KeyValue]:
        """The KeySpace's decode of one etcd KeyValue, or None (a rejection, logged there)."""
        return self.decode(
            KeyValue(
                bytes(kv.key),
                bytes(kv.value),
                int(kv.create_revision),
                int(kv.mod_revision),
                int(kv.version),
                int(kv.lease),
                None,
            )
        )


def fetch(
    ks: "KeySpace",
    client: Any,
    rev: int,
    page_size: Optional[int],
    page_bytes: int,
    progress: Optional[Callable[[int], None]],
    status: LoadStatus,
    stop: Optional[threading.Event] = None,
) -> Tuple["Header", Any, Set[bytes]]:
    """Read every key under ``ks.root`` at ``rev`` (0: now): (header, store, excluded keys).

    Streamed when the server has RangeStream and no ``page_size`` is forced,
    else paged (see the module doc). Cost: etcd's work plus the decoder's,
    linear in keys and bytes; the next page (or chunk) is read while this one
    is decoded.
    """
    from .keyspace import Header, patch_header

    end = prefix_end(ks.root_key) or b"\0"
    sink = _Sink(ks, status, progress)
    status.keys = 0
    status.streamed = False
    start = ks.root_key
    header: Optional[Header] = None
    if page_size is None:
        streamed = _stream(client, ks.root_key, end, rev, sink, status)
        if streamed is not None:
            resp_header, done = streamed
            header = patch_header(Header(), resp_header, reset=True)
            rev = rev or int(resp_header.revision)
            header = replace(header, revision=rev)
            if done:
                return header, sink.loader.finish(), sink.excluded
            start = sink.last_key + b"\0" if sink.n else ks.root_key
    cap = page_size or (1 << 62)
    asked = min(cap, FIRST_PAGE)
    resp, got_limit = range_page(client, start, end, asked, rev, status, stop, sink.n)
    if header is None:
        header = patch_header(Header(), resp.header, reset=True)
        # etcd's header carries the store's current revision, not the one asked
        # for: a load at rev=R is exact at R (as Gazette records it).
        rev = rev or int(resp.header.revision)
        header = replace(header, revision=rev)
    budget = page_bytes
    while True:
        nxt: Optional[_Prefetch] = None
        if resp.more and resp.kvs:
            per_key = max(1, resp.ByteSize() // len(resp.kvs))
            if got_limit < asked:  # halved: what fitted (or answered in time) is the budget now
                budget = min(budget, per_key * got_limit)
            asked = max(1, min(cap, budget // per_key))
            nstart = bytes(resp.kvs[-1].key) + b"\0"
            # Overlap: etcd (on another core) serves the next page while this
            # one is decoded here.
            nxt = _Prefetch(client, nstart, end, asked, rev, status, stop, sink.n + len(resp.kvs))
        sink.add(resp.kvs)
        if nxt is None:
            break
        # Dropped before the next page lands: at most one page's protobuf is alive
        # once this one is decoded (a page is up to PAGE_BYTES on the wire and ~2x parsed).
        del resp
        resp, got_limit = nxt.result()
        if not resp.kvs:
            break
    return header, sink.loader.finish(), sink.excluded


def _stream(
    client: Any, key: bytes, end: bytes, rev: int, sink: _Sink, status: LoadStatus
) -> Optional[Tuple[Any, bool]]:
    """Read the range through RangeStream into ``sink``: (header, finished), or None when unusable.

    None: the client cannot make the call, the server answered UNIMPLEMENTED
    (remembered for this client), or the stream failed before telling its
    revision (nothing was decoded then). ``finished`` False: the stream broke
    or stalled for a request timeout after delivering keys at the header's
    revision; the caller reads the rest as pages from ``sink.last_key``.
    """
    from . import etcd

    if not etcd.supports_range_stream(client):
        return None
    stream = etcd.RangeStream(client, key, end, rev)
    header: Any = None
    try:
        for chunk in stream:
            if chunk.header.cluster_id and (header is None or not header.revision):
                header = chunk.header
            if chunk.kvs and (header is None or not (rev or header.revision)):
                raise RuntimeError("etcd RangeStream sent keys before its revision")
            sink.add(chunk.kvs)
    except Exception as exc:
        if etcd.is_unimplemented(exc):
            etcd.mark_no_range_stream(client)
            log.info("etcd has no RangeStream (etcd < 3.7 or a gRPC proxy): loading in pages")
            return None
        status.last_error = describe(exc)
        if header is None or sink.n == 0:
            log.warning("etcd RangeStream failed (%s): loading in pages", describe(exc))
            return None
        log.warning(
            "etcd RangeStream broke after %d keys (%s): the rest in pages at revision %d",
            sink.n,
            describe(exc),
            rev or int(header.revision),
        )
        return header, False
    finally:
        stream.close()
    if header is None:
        return None
    status.streamed = True
    return header, True
