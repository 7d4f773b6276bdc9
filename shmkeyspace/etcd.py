"""etcd glue: choosing and connecting a python-etcd3-API client.

Only the writer side imports this module; it is what pulls in grpc and protobuf.
Readers never need it.

It also owns the watch stream the writer follows (:class:`WatchStream`: progress
requests and etcd's "require leader" metadata, which the client libraries'
shared watchers cannot send), the deadline-bound :func:`probe`, and
:class:`Failover`, which moves a writer from member to member. The embedded etcd
that the tests, the benchmarks and the demo start is ``embedded.py``.

Client choice (measured, see README): ``etcd-sdk-python`` (import ``pyetcd``)
is preferred; it has python-etcd3's API and works with modern protobuf.
``etcd3`` 0.12 is supported too: its generated code only imports with protobuf
>= 4 under the pure-Python backend, so :func:`import_client_module` selects that
backend when it has to import ``etcd3`` and protobuf is not loaded yet.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import queue
import sys
import threading
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import (
    ClientMissingError,
    EtcdConnectError,
    FileMissingError,
    InvalidSettingError,
    WatchCanceledError,
    WatchCompactedError,
    describe,
)

log = logging.getLogger(__name__)

CLIENTS = ("pyetcd", "etcd3")
#: Large snapshots page through Range; a generous receive limit keeps pages big.
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def parse_endpoints(endpoints: Union[str, Sequence[str]]) -> List[Tuple[str, int]]:
    """Parse ``host:port[,host:port...]`` (a URL scheme is allowed and ignored)."""
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    out = []
    for ep in endpoints:
        ep = ep.strip()
        for scheme in ("http://", "https://"):
            if ep.startswith(scheme):
                ep = ep[len(scheme) :]
        host, sep, port = ep.rstrip("/").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidSettingError(f"bad etcd endpoint {ep!r}: expected HOST:PORT")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise InvalidSettingError("no etcd endpoint given")
    return out


def import_client_module(name: str = "auto") -> Any:
    """Import the etcd client library ``name`` ('pyetcd', 'etcd3' or 'auto')."""
    names = CLIENTS if name == "auto" else (name,)
    errors = []
    for n in names:
        if n not in CLIENTS:
            raise InvalidSettingError(f"unknown etcd client {n!r}: choose one of {', '.join(CLIENTS)}")
        if n == "etcd3" and "google.protobuf" not in sys.modules:
            # etcd3 0.12's generated code predates protobuf 4; the pure-Python
            # backend is the only one that still accepts it.
            os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
        try:
            return __import__(n)
        except Exception as exc:  # ImportError, or protobuf's TypeError on old gencode
            errors.append(f"{n}: {exc}")
    raise ClientMissingError(
        "no usable etcd client library ("
        + "; ".join(errors)
        + "). Install the writer extra: pip install 'shmkeyspace[writer]'"
    )


def connect(
    endpoints: Union[str, Sequence[str]] = "127.0.0.1:2379",
    *,
    client: str = "auto",
    timeout: Optional[float] = 10.0,
    user: Optional[str] = None,
    password: Optional[str] = None,
    ca_cert: Optional[str] = None,
    cert_cert: Optional[str] = None,
    cert_key: Optional[str] = None,
    check: bool = True,
) -> Any:
    """A python-etcd3-API client for ``endpoints``.

    With several endpoints (pyetcd only) the client fails over between them.
    ``check`` asks the cluster for its status so a wrong address fails here,
    with a clear message, instead of at the first watch.
    """
    eps = parse_endpoints(endpoints)
    mod = import_client_module(client)
    for path in (ca_cert, cert_cert, cert_key):
        if path is not None and not os.path.isfile(path):
            raise FileMissingError(f"TLS file not found: {path}")
    if (cert_cert is None) != (cert_key is None):
        raise InvalidSettingError("a client certificate needs both --cert and --key")
    if mod.__name__ == "pyetcd":
        creds = None
        if ca_cert:
            creds = mod.MultiEndpointEtcd3Client.get_secure_creds(ca_cert, cert_key, cert_cert)
        # A short time_retry: pyetcd marks an endpoint failed on UNAVAILABLE and
        # would otherwise refuse it for 300 s, defeating reconnects.
        endpoints_ = [
            mod.Endpoint(h, p, secure=creds is not None, creds=creds, time_retry=0.2, opts=GRPC_OPTIONS)
            for h, p in eps
        ]
        c = mod.MultiEndpointEtcd3Client(
            endpoints=endpoints_, timeout=timeout, user=user, password=password, failover=True
        )
    else:
        if len(eps) > 1:
            log.warning("the etcd3 client uses one endpoint; using %s:%d", *eps[0])
        h, p = eps[0]
        c = mod.client(
            host=h,
            port=p,
            ca_cert=ca_cert,
            cert_key=cert_key,
            cert_cert=cert_cert,
            timeout=timeout,
            user=user,
            password=password,
            grpc_options=GRPC_OPTIONS,
        )
    if not ca_cert and getattr(c, "call_credentials", None) is not None:
        # gRPC refuses call credentials on a plain-text channel (UNAUTHENTICATED:
        # "insufficient security level"), so user/password without TLS failed at the
        # first request; the token also travels in the metadata, where etcd reads it.
        c.call_credentials = None
    if check:
        try:
            c.status()
        except Exception as exc:
            c.close()
            where = ",".join(f"{h}:{p}" for h, p in eps)
            raise EtcdConnectError(
                f"cannot reach etcd at {where}: {type(exc).__name__} {exc}".strip()
            ) from None
    return c


# -- the watch stream, probes and failover --------------------------------------------

#: The gRPC metadata etcd's Go client adds with ``clientv3.WithRequireLeader``:
#: etcd refuses the stream when the member has no leader, and cancels it (status
#: UNAVAILABLE, "etcdserver: no leader") once the member has lost its leader for
#: about three election timeouts (etcd's v3rpc ``monitorLeader``).
REQUIRE_LEADER_METADATA = ("hasleader", "true")


def _client_module(client: Any, sub: str) -> Any:
    """``pyetcd.etcdrpc`` / ``etcd3.events``...: the generated code of the client's own library.

    Using the client's own copy matters: both libraries register the same
    ``rpc.proto`` names, so a process must not load the other one's.
    """
    pkg = type(client).__module__.split(".")[0]
    return importlib.import_module(f"{pkg}.{sub}")


def supports_watch_stream(client: Any) -> bool:
    """True if ``client`` exposes what :class:`WatchStream` needs (both supported libraries do)."""
    if not hasattr(client, "channel") or not hasattr(client, "metadata"):
        return False
    try:
        rpc = _client_module(client, "etcdrpc")
        _client_module(client, "events")
    except ImportError:
        return False
    return hasattr(rpc, "WatchStub") and hasattr(rpc, "WatchCreateRequest")


class WatchResponse:
    """One etcd watch response: ``header`` and decoded ``events`` (PutEvent/DeleteEvent).

    ``created`` marks the stream's first answer; a response with neither events
    nor ``created`` is a progress notification.
    """

    __slots__ = ("header", "events", "created")

    def __init__(self, header: Any, events: List[Any], created: bool = False) -> None:
        self.header = header
        self.events = events
        self.created = created


class WatchStream:
    """One etcd Watch call of the keys in ``[key, range_end)``, owned by the caller.

    Why not the client library's watcher: it shares one stream among watches,
    drops the answers to progress requests (they carry watch id -1), cannot add
    the require-leader metadata, and its cancel queues a request that a hung
    member never reads. Here :meth:`close` cancels the gRPC call locally and at
    once.

    ``deliver`` is called on the stream's own thread with every response (a
    :class:`WatchResponse`, created and progress ones included), then at most one
    exception: the gRPC error, :class:`~shmkeyspace.errors.WatchCompactedError`,
    or :class:`~shmkeyspace.errors.WatchCanceledError`. Nothing is delivered
    after :meth:`close` returns... except what was already being delivered.
    Cost: one thread and one HTTP/2 stream per WatchStream.
    """

    def __init__(
        self,
        client: Any,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        deliver: Callable[[Any], None],
        *,
        require_leader: bool = True,
        progress_notify: bool = True,
    ) -> None:
        self._rpc = _client_module(client, "etcdrpc")
        self._new_event = _client_module(client, "events").new_event
        self._deliver = deliver
        self._requests: "queue.Queue[Any]" = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        create = self._rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, progress_notify=progress_notify
        )
        self._requests.put(self._rpc.WatchRequest(create_request=create))
        metadata = tuple(client.metadata or ())
        if require_leader:
            metadata += (REQUIRE_LEADER_METADATA,)
        stub = self._rpc.WatchStub(client.channel)
        # The auth token travels in the metadata (as the client libraries also
        # send it); their call_credentials are refused on a plain-text channel.
        self._call = stub.Watch(self._request_iter(), metadata=metadata)
        self._thread = threading.Thread(target=self._run, daemon=True, name="shmkeyspace-watch-stream")
        self._thread.start()

    @property
    def can_request_progress(self) -> bool:
        """False when the client library's protocol code predates progress requests (etcd3 0.12)."""
        return hasattr(self._rpc, "WatchProgressRequest")

    def request_progress(self) -> bool:
        """Ask etcd for a progress notification (non-blocking); False if unsupported here.

        etcd >= 3.4 answers with a response carrying its current revision; the
        gRPC proxy ignores the request (etcd issue 19710).
        """
        if not self.can_request_progress or self._closed:
            return False
        self._requests.put(self._rpc.WatchRequest(progress_request=self._rpc.WatchProgressRequest()))
        return True

    def close(self) -> None:
        """Cancel the stream (locally, immediately). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._requests.put(None)
        self._call.cancel()

    def _request_iter(self) -> Iterator[Any]:
        while True:
            rq = self._requests.get()
            if rq is None:
                return
            yield rq

    def _run(self) -> None:
        err: Optional[BaseException] = None
        try:
            for rs in self._call:
                if self._closed:
                    return
                if rs.compact_revision:
                    err = WatchCompactedError(int(rs.compact_revision))
                    break
                if rs.canceled:
                    err = WatchCanceledError(rs.cancel_reason or "watch canceled by etcd")
                    break
                events = [self._new_event(ev) for ev in rs.events]
                self._deliver(WatchResponse(rs.header, events, bool(rs.created)))
            else:
                err = WatchCanceledError("etcd ended the watch stream")
        except Exception as exc:  # grpc.RpcError, including our own cancel
            err = exc
        finally:
            if not self._closed:
                self._deliver(err)
            self.close()


def probe(client: Any, key: bytes, timeout: float) -> Any:
    """A linearizable read of one key with a deadline; returns etcd's response header.

    The cheap request behind contact tracking where progress requests are not
    answered: linearizable, so it also fails on a member without a leader.
    Costs one round trip to the member plus its ReadIndex round to the leader;
    raises the gRPC error (DEADLINE_EXCEEDED for a hung member).
    """
    rpc = _client_module(client, "etcdrpc")
    stub = rpc.KVStub(client.channel)
    resp = stub.Range(rpc.RangeRequest(key=key, keys_only=True, limit=1), timeout, metadata=client.metadata)
    return resp.header


# -- etcd 3.7's streamed Range ---------------------------------------------------------

#: The server-streaming Range of etcd >= 3.7 (etcd issues 21619, 21631; Kubernetes
#: KEP-5966): ``rpc RangeStream(RangeRequest) returns (stream RangeStreamResponse)``
#: where ``RangeStreamResponse`` is ``{RangeResponse range_response = 1;}``. The
#: server pages internally at one pinned revision and counts once; the chunks
#: merged give what one Range would: the header (cluster, member, term) first,
#: the revision with the first keys, ``count``/``more`` in the last chunk.
RANGE_STREAM_METHOD = "/etcdserverpb.KV/RangeStream"


def supports_range_stream(client: Any) -> bool:
    """True if a RangeStream call can be tried on ``client`` (not yet refused by its server)."""
    return supports_watch_stream(client) and not getattr(client, "_shmkeyspace_no_range_stream", False)


def mark_no_range_stream(client: Any) -> None:
    """Remember that ``client``'s server answered RangeStream with UNIMPLEMENTED."""
    try:
        client._shmkeyspace_no_range_stream = True
    except AttributeError:
        pass


def is_unimplemented(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    return callable(code) and getattr(code(), "name", "") == "UNIMPLEMENTED"


def _range_stream_chunk(rpc: Any) -> Callable[[bytes], Any]:
    """A deserializer of RangeStreamResponse into its RangeResponse (no generated code needed).

    The message has one field, 1 (length-delimited): its bytes are tag 0x0a, a
    varint length and a RangeResponse, possibly repeated (protobuf merges them);
    unknown fields are skipped.
    """

    def parse(data: bytes) -> Any:
        out = rpc.RangeResponse()
        i, n = 0, len(data)
        while i < n:
            tag, i = _varint(data, i)
            wire = tag & 7
            if wire == 2:
                size, i = _varint(data, i)
                if tag >> 3 == 1:
                    out.MergeFromString(data[i : i + size])
                i += size
            elif wire == 0:
                _, i = _varint(data, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"bad RangeStreamResponse wire type {wire}")
        return out

    return parse


def _varint(data: bytes, i: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


class RangeStream:
    """One RangeStream call of ``[key, range_end)`` at ``revision`` (0: now); iterate its chunks.

    Each item is a RangeResponse chunk (see RANGE_STREAM_METHOD). The call runs
    on a thread of its own, so the caller decodes one chunk while etcd sends the
    next; no chunk for the client's request timeout raises TimeoutError (the
    call is then cancelled). gRPC errors are raised as they are (UNIMPLEMENTED:
    a server before 3.7). :meth:`close` cancels. Cost: one thread, one stream.
    """

    def __init__(self, client: Any, key: bytes, range_end: bytes, revision: int) -> None:
        rpc = _client_module(client, "etcdrpc")
        self.timeout = getattr(client, "timeout", None) or 60.0
        call = client.channel.unary_stream(
            RANGE_STREAM_METHOD,
            request_serializer=rpc.RangeRequest.SerializeToString,
            response_deserializer=_range_stream_chunk(rpc),
        )
        req = rpc.RangeRequest(key=key, range_end=range_end, revision=revision)
        self._call = call(req, metadata=tuple(client.metadata or ()))
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize=4)
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="shmkeyspace-range-stream")
        self._thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._call:
                if self._closed:
                    return
                self._q.put(chunk)
            self._q.put(None)
        except Exception as exc:  # grpc.RpcError, our own cancel included
            if not self._closed:
                self._q.put(exc)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._q.get(timeout=self.timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"etcd RangeStream sent nothing for {self.timeout:g}s") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Cancel the call. Idempotent."""
        if not self._closed:
            self._closed = True
            self._call.cancel()
            try:  # unblock a producer waiting on a full queue
                self._q.get_nowait()
            except queue.Empty:
                pass


class Failover:
    """Clients for a list of endpoints, one member at a time.

    :meth:`connect` returns a client for the first endpoint that answers a
    :func:`probe` within ``probe_timeout``; :meth:`next` closes the current
    client and tries the endpoints after it in order (wrapping around, the
    current one last). Each client talks to one member, so the caller, not the
    client library, decides when to move on. Not thread-safe: the writer's
    watch thread owns it, except :meth:`close`, which may come from the thread
    stopping the writer while a :meth:`next` is probing.
    """

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]],
        *,
        probe_timeout: float = 2.0,
        probe_key: bytes = b"\0shmkeyspace-probe",
        **connect_args: Any,
    ) -> None:
        self.endpoints = [f"{h}:{p}" for h, p in parse_endpoints(endpoints)]
        self.probe_timeout = probe_timeout
        self.probe_key = probe_key
        connect_args.pop("check", None)  # every endpoint is checked by a probe instead
        self._connect_args = connect_args
        self._index = len(self.endpoints) - 1  # so connect() starts with the first endpoint
        self.client: Any = None
        self._closed = False

    @property
    def endpoint(self) -> Optional[str]:
        """The endpoint of the current client (None before :meth:`connect`)."""
        return self.endpoints[self._index] if self.client is not None else None

    def connect(self) -> Any:
        """The current client, connecting (from the first endpoint on) if there is none."""
        if self.client is None:
            self._move_on()
        return self.client

    def next(self) -> Any:
        """Drop the current client and connect to the next endpoint that answers."""
        self._drop()
        return self._move_on()

    def _move_on(self) -> Any:
        n = len(self.endpoints)
        errors = []
        for i in itertools.islice(itertools.count(self._index + 1), n):
            ep = self.endpoints[i % n]
            c = connect(ep, check=False, **self._connect_args)
            try:
                probe(c, self.probe_key, self.probe_timeout)
            except Exception as exc:
                errors.append(f"{ep}: {describe(exc)}")
                _close_quietly(c)
                continue
            if self._closed:  # close() ran on another thread while this one probed
                _close_quietly(c)
                raise ConnectionError("etcd failover closed")
            self._index = i % n
            self.client = c
            if errors:
                log.info("etcd: using %s (skipped %s)", ep, "; ".join(errors))
            return c
        if n == 1:
            errors = [e.split(": ", 1)[1] for e in errors]
        raise ConnectionError(f"cannot reach etcd at {','.join(self.endpoints)}: " + "; ".join(errors))

    def close(self) -> None:
        """Close the current client; a :meth:`next` still probing on another thread gives up."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        if self.client is not None:
            _close_quietly(self.client)
            self.client = None


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass
