"""Writers behind a real ``etcd grpc-proxy`` (the same etcd binary): the many-hosts setup.

What is checked, against real etcd, a real proxy and real writer processes:

* loads never use the proxy's range cache (etcd issue 14665): the cache answers
  only *serializable* Range requests, and every request a load makes is
  linearizable. The test first shows the hazard itself (a serializable read through
  the proxy returning a value etcd has already replaced), then loads through the
  same proxy and gets etcd's current data, with the cache-hit counter unchanged;
* 10 writers (10 simulated hosts: distinct snapshot names, one prefix) behind one
  proxy while etcd takes random churn cost etcd ``2 + B`` watchers, where 2 are the
  proxy's own lost-leader watches (one for its watch API, one for its lease API)
  and B, the upstream watches of the prefix, settles at most ``max(1, K // 5)``
  (see :func:`coalesced_bound`); the same 10 writers connected directly cost 10;
* every writer's snapshot equals etcd at its revision after churn, after the proxy
  is SIGKILLed and restarted mid-stream (readers see the writers ``stale`` while it
  is down: behind a proxy, contact is proven by reads, not progress requests), after a compaction past the writers while
  the proxy was down (each reloads), and after etcd itself is restarted under the
  proxy;
* TLS on both hops and etcd authentication through the proxy: etcd checks the
  writer's own user, a user without read permission on the prefix is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
from typing import Dict, List

import helpers_procs as hp
import pytest

from shmkeyspace import Reader, Writer
from shmkeyspace.children import writer_command
from shmkeyspace.embedded import EtcdGrpcProxy, EtcdServer, find_etcd_binary, free_port, scrape_metrics
from shmkeyspace.etcd import connect
from shmkeyspace.key_values import prefix_end

K = 10
KEYS = 100
#: The writers' --stale-after: short, so the proxy-outage check is quick.
STALE_AFTER = 2.0
WATCHERS = "etcd_debugging_mvcc_watcher_total"
STREAMS = "etcd_debugging_mvcc_watch_stream_total"
#: Upstream watches a proxy holds on its own: grpcproxy's ``leader`` watches the key
#: ``__lostleader`` at a future revision to learn of leader loss, once for the watch
#: API and once for the lease API (server/proxy/grpcproxy/leader.go, watch.go, lease.go).
PROXY_OWN_WATCHERS = 2


def coalesced_bound(k: int) -> int:
    """Most upstream watches ``k`` same-prefix watchers settle into behind one proxy.

    From etcd's server/proxy/grpcproxy (3.5): watchers of one key range share a
    ``watchBroadcast`` (one upstream watch). A new watcher joins an existing
    broadcast only if that broadcast is not ahead of the watcher's start revision;
    a writer that loaded while etcd moved on starts behind and gets its own. After
    each response a broadcast with fewer than ``maxCoalesceReceivers`` (5) receivers
    moves them into any started broadcast that is not ahead of it, so under churn
    every small broadcast is absorbed; two broadcasts of 5 or more are never merged.
    Hence at most ``max(1, k // 5)`` once every writer is caught up.
    """
    return max(1, k // 5)


def _upstream(etcd) -> Dict[str, int]:
    m = scrape_metrics(etcd.metrics_url)
    return {"watchers": int(m[WATCHERS]), "streams": int(m[STREAMS])}


def _newest(client, prefix: str) -> int:
    p = prefix.encode()
    return client.get_range_response(p, prefix_end(p), limit=1).header.revision


def _assert_equals_etcd(reader: Reader, client, prefix: str, revision: int) -> None:
    """The snapshot at ``revision`` equals etcd's range at that revision, key by key."""
    with reader.snapshot(copy=True) as s:
        assert s.revision == revision, (reader.name, s.revision, revision)
        mine = [(e.key, e.decoded, e.create_revision, e.mod_revision, e.version) for e in s.prefixed(prefix)]
    p = prefix.encode()
    resp = client.get_range_response(p, prefix_end(p), revision=revision)
    theirs = [
        (bytes(kv.key).decode(), json.loads(kv.value), kv.create_revision, kv.mod_revision, kv.version)
        for kv in resp.kvs
    ]
    assert mine == theirs, reader.name


class Churn:
    """Random puts and deletes under ``prefix`` from a thread, straight to etcd.

    Survives etcd going away (counts the failures, retries). ``writes`` counts
    acknowledged writes, so tests can wait for "N more writes" instead of sleeping.
    """

    def __init__(self, endpoint: str, prefix: str, seed: int = 0) -> None:
        self.endpoint, self.prefix = endpoint, prefix
        self.rnd = random.Random(seed)
        self.writes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Churn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_writes(self, more: int, timeout: float = 60) -> None:
        target = self.writes + more
        assert hp.wait_until(lambda: self.writes >= target, timeout), (self.writes, target)

    def _run(self) -> None:
        c = connect(self.endpoint, check=False, timeout=2)
        try:
            while not self._stop.is_set():
                i = self.rnd.randrange(KEYS)
                key = f"{self.prefix}/k{i:03d}"
                try:
                    if self.rnd.random() < 0.1:
                        c.delete(key)
                    else:
                        c.put(key, json.dumps([self.writes, i]))
                    self.writes += 1
                except Exception:
                    self.failures += 1
                    self._stop.wait(0.1)
                self._stop.wait(0.003)
        finally:
            c.close()


def _seed(client, prefix: str) -> None:
    for i in range(KEYS):
        client.put(f"{prefix}/k{i:03d}", json.dumps(["seed", i]))


def _spawn_writers(endpoint: str, prefix: str, names: List[str], logdir) -> List[subprocess.Popen]:
    procs = []
    for n in names:
        log = open(os.path.join(logdir, f"{n}.log"), "w")
        procs.append(
            subprocess.Popen(
                [
                    *writer_command(endpoint, prefix, n, python=hp.PYTHON),
                    "--decoder",
                    "json",
                    "--apply-delay",
                    "5",
                    "--heartbeat",
                    "0.2",
                    "--stale-after",
                    str(STALE_AFTER),
                    "--unlink-on-exit",
                    "--log-level",
                    "info",
                ],
                env=hp.child_env(),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()
    return procs


def _all_equal_etcd(readers: List[Reader], client, prefix: str, procs=()) -> int:
    rev = _newest(client, prefix)
    for r in readers:
        assert r.wait_for_revision(rev, 60), (r.name, r.revision, rev)
        _assert_equals_etcd(r, client, prefix, rev)
    for p in procs:
        assert p.poll() is None, f"writer pid {p.pid} exited with {p.returncode}"
    return rev


def _log_count(logdir, names: List[str], text: str) -> int:
    """Lines containing ``text`` in the writers' logs."""
    n = 0
    for name in names:
        with open(os.path.join(logdir, f"{name}.log")) as f:
            n += sum(text in line for line in f)
    return n


# -- the proxy's range cache -------------------------------------------------------------


def test_load_never_uses_the_proxy_range_cache(own_etcd, prefix):
    with EtcdGrpcProxy(own_etcd.endpoint) as proxy:
        direct = connect(own_etcd.endpoint)
        via = connect(proxy.endpoint)
        try:
            for i in range(7):
                direct.put(f"{prefix}/k{i}", json.dumps(["v1", i]))
            key = f"{prefix}/k0".encode()
            # The hazard: a serializable read fills the cache; a write that does not go
            # through this proxy cannot invalidate it; the next serializable read is stale.
            assert via.get_range_response(key, key + b"\0", serializable=True).kvs[0].value == b'["v1", 0]'
            direct.put(f"{prefix}/k0", json.dumps(["v2", 0]))
            hits = proxy.metrics()["etcd_grpc_proxy_cache_hits_total"]
            stale = via.get_range_response(key, key + b"\0", serializable=True)
            assert stale.kvs[0].value == b'["v1", 0]', "the proxy no longer caches: revisit this test"
            assert proxy.metrics()["etcd_grpc_proxy_cache_hits_total"] == hits + 1

            from shmkeyspace.keyspace import KeySpace

            hits = proxy.metrics()["etcd_grpc_proxy_cache_hits_total"]
            # Several pages: the first at "now", the rest at the first page's revision;
            # done twice, so the second load asks exactly what the first one cached.
            for n in range(2):
                ks = KeySpace(prefix, lambda kv: json.loads(kv.value))
                ks.load(via, page_size=2)
                assert ks.header.revision == _newest(direct, prefix)
                assert ks.key_values.get(key).decoded == ["v2", 0]
                assert len(ks.key_values) == 7
                direct.put(f"{prefix}/k1", json.dumps(["v3", n]))  # stale the cache again
            # An explicit-revision load: the pages are answered by etcd too.
            rev = _newest(direct, prefix) - 1
            ks = KeySpace(prefix, lambda kv: json.loads(kv.value))
            ks.load(via, rev=rev, page_size=3)
            assert ks.header.revision == rev and ks.key_values.get(f"{prefix}/k1".encode()).decoded == [
                "v3",
                0,
            ]
            m = proxy.metrics()
            assert m["etcd_grpc_proxy_cache_hits_total"] == hits, "a load was answered from the proxy cache"
        finally:
            direct.close()
            via.close()


# -- 10 hosts -------------------------------------------------------------------------------


def test_direct_writers_cost_one_upstream_watch_each(own_etcd, prefix, shm_name):
    """The baseline the proxy is measured against: K direct writers, K etcd watchers."""
    client = connect(own_etcd.endpoint)
    _seed(client, prefix)
    base = _upstream(own_etcd)
    writers = []
    try:
        for i in range(K):
            # In-process writers (each with its own client, so its own watch stream):
            # etcd sees exactly what K writer processes would ask of it.
            writers.append(
                Writer(f"{shm_name}-{i}", prefix, endpoints=own_etcd.endpoint, unlink_on_exit=True)
            )
            writers[-1].start()
        assert hp.wait_until(lambda: _upstream(own_etcd)["watchers"] == base["watchers"] + K, 30), (
            _upstream(own_etcd),
            base,
        )
        assert _upstream(own_etcd)["streams"] == base["streams"] + K
    finally:
        for w in writers:
            w.stop()
        client.close()


def test_ten_writers_behind_one_proxy(own_etcd, prefix, shm_name, tmp_path):
    client = connect(own_etcd.endpoint)
    names = [f"{shm_name}-{i}" for i in range(K)]
    procs: List[subprocess.Popen] = []
    readers: List[Reader] = []
    _seed(client, prefix)
    proxy = EtcdGrpcProxy(own_etcd.endpoint).start()
    try:
        assert hp.wait_until(lambda: _upstream(own_etcd)["watchers"] == PROXY_OWN_WATCHERS, 30), _upstream(
            own_etcd
        )
        with Churn(own_etcd.endpoint, prefix, seed=1) as churn:
            procs = _spawn_writers(proxy.endpoint, prefix, names, tmp_path)
            readers = [Reader(n, wait=120) for n in names]
            # Writers that loaded at different revisions start in separate broadcasts
            # and are merged as they catch up; churn keeps the coalescing going.
            bound = PROXY_OWN_WATCHERS + coalesced_bound(K)
            settled = hp.wait_until(lambda: _upstream(own_etcd)["watchers"] <= bound, 60, interval=0.2)
            assert settled, (_upstream(own_etcd), bound)
            assert _upstream(own_etcd)["watchers"] >= PROXY_OWN_WATCHERS + 1
        _all_equal_etcd(readers, client, prefix, procs)

        assert not any(r.health().stale for r in readers), [r.health() for r in readers]

        # The proxy SIGKILLed mid-stream and restarted on the same port. The writers
        # cannot ask it for progress (etcd issue 19710) and prove contact with reads
        # through it instead: while it is down readers see them stale (alive, but no
        # contact with etcd); after the restart each resumes from its revision.
        with Churn(own_etcd.endpoint, prefix, seed=2) as churn:
            churn.wait_writes(50)
            proxy.kill()
            churn.wait_writes(100)
            assert hp.wait_until(lambda: all(r.health().stale for r in readers), 30, interval=0.1), [
                r.health() for r in readers
            ]
            assert all(r.health().writer_alive for r in readers)
            proxy.start()
            churn.wait_writes(100)
        _all_equal_etcd(readers, client, prefix, procs)
        assert hp.wait_until(lambda: not any(r.health().stale for r in readers), 30, interval=0.1), [
            r.health() for r in readers
        ]
        for r in readers:
            h = r.health()
            assert h.writer_alive and h.lag == 0 and h.etcd_contact_age < STALE_AFTER, h

        # etcd compacts past every writer while the proxy is down: each one finds out
        # before it watches again (KeySpace._check_start) and reloads. Twice: without
        # that check, one of this test's first two runs left 10 writers stuck on a
        # dead upstream watch for good (etcd issue 21813).
        for rnd in range(2):
            proxy.kill()
            with Churn(own_etcd.endpoint, prefix, seed=3 + rnd) as churn:
                churn.wait_writes(100)
            client.compact(_newest(client, prefix))
            proxy.start()
            _all_equal_etcd(readers, client, prefix, procs)
            assert _log_count(tmp_path, names, "compacted") == K * (rnd + 1)
            with Churn(own_etcd.endpoint, prefix, seed=5 + rnd) as churn:
                churn.wait_writes(50)
            _all_equal_etcd(readers, client, prefix, procs)

        # etcd restarted under a live proxy: the proxy's own client resumes its
        # upstream watches; the writers do not even reconnect.
        with Churn(own_etcd.endpoint, prefix, seed=7) as churn:
            churn.wait_writes(50)
            own_etcd.kill()
            own_etcd.start()
            churn.wait_writes(100)
        client.close()
        client = connect(own_etcd.endpoint)
        _all_equal_etcd(readers, client, prefix, procs)
        hp.report_counts(
            "writers behind grpc-proxy",
            faults=3,
            answers=K * 4,
            inconsistencies=0,
            upstream_watchers=_upstream(own_etcd)["watchers"],
        )
    finally:
        for r in readers:
            r.close()
        for p in procs:
            hp.stop(p)
        proxy.stop()
        client.close()
    for p in procs:
        assert p.returncode == 0, p.returncode


# -- TLS and authentication through the proxy ------------------------------------------------


def _make_certs(d) -> Dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1, and the proxy's client
    certificate towards etcd, whose subject has no CN (etcd issue 11970)."""
    ca_key, ca, ext = (os.path.join(d, f) for f in ("ca.key", "ca.pem", "ext"))
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "1",
        "-subj",
        "/CN=shmks-test-ca",
    )
    out = {"ca": ca}
    for name, subject in (("server", "/CN=localhost"), ("proxy", "/O=shmks-proxy")):
        key, csr, cert = (os.path.join(d, f"{name}.{x}") for x in ("key", "csr", "pem"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
        _openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "1",
            "-extfile",
            ext,
        )
        out[name], out[f"{name}_key"] = cert, key
    return out


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _etcdctl(endpoint: str, *args: str, user: str = "") -> None:
    ctl = os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")
    subprocess.run(
        [ctl, "--endpoints", endpoint, *(["--user", user] if user else []), *args],
        check=True,
        capture_output=True,
        env=hp.child_env(),
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certificates")
def test_tls_and_auth_through_the_proxy(tmp_path, prefix, shm_name):
    """Writer --cacert/--user through a TLS proxy to a TLS etcd with auth on: etcd checks the
    writer's own user (the proxy forwards its token), for the load and for the watch."""
    certs = _make_certs(str(tmp_path))
    srv = EtcdServer()
    tls_port = free_port()
    srv.extra_args = [
        "--listen-client-urls",
        f"http://127.0.0.1:{srv.client_port},https://127.0.0.1:{tls_port}",
        "--cert-file",
        certs["server"],
        "--key-file",
        certs["server_key"],
    ]
    with srv:
        plain = srv.endpoint  # set-up only; everything under test goes through TLS
        _etcdctl(plain, "user", "add", "root:rootpw")
        _etcdctl(plain, "role", "add", "mirror")
        _etcdctl(plain, "role", "grant-permission", "mirror", "--prefix=true", "read", prefix)
        _etcdctl(plain, "user", "add", "shmks:pw1")
        _etcdctl(plain, "user", "grant-role", "shmks", "mirror")
        _etcdctl(plain, "user", "add", "nobody:pw2")
        _etcdctl(plain, "auth", "enable")
        _etcdctl(plain, "put", f"{prefix}/a", '"1"', user="root:rootpw")
        with EtcdGrpcProxy(
            f"127.0.0.1:{tls_port}",
            ca_cert=certs["ca"],
            cert=certs["proxy"],
            key=certs["proxy_key"],
            listen_cert=certs["server"],
            listen_key=certs["server_key"],
        ) as proxy:
            w = Writer(
                shm_name,
                prefix,
                endpoints=proxy.endpoint,
                connect_args=dict(user="shmks", password="pw1", ca_cert=certs["ca"]),
                decoder=lambda kv: json.loads(kv.value),
                unlink_on_exit=True,
            )
            try:
                w.start()
                with Reader(shm_name) as r:
                    assert r.get(f"{prefix}/a").decoded == "1"
                    rev = r.revision
                    _etcdctl(plain, "put", f"{prefix}/b", '"2"', user="root:rootpw")
                    assert r.wait_for_revision(rev + 1, 30), r.revision
                    assert r.get(f"{prefix}/b").decoded == "2"
            finally:
                w.stop()
            # A user etcd does not allow to read the prefix is refused through the proxy.
            other = Writer(
                f"{shm_name}-x",
                prefix,
                endpoints=proxy.endpoint,
                connect_args=dict(user="nobody", password="pw2", ca_cert=certs["ca"]),
                unlink_on_exit=True,
            )
            try:
                with pytest.raises(Exception, match="permission denied"):
                    other.start()
            finally:
                other.stop()


def test_a_silent_stream_behind_the_proxy_is_reopened(tmp_path, prefix, shm_name, caplog):
    """Issue 21: behind a proxy, contact is proven by reads, so a watch stream that
    delivers nothing (etcd issue 21813: a watcher left on a broadcast that never
    delivers again) would keep a frozen writer "fresh". With ``watch_silence`` the
    writer abandons a stream that delivered nothing, not even a progress notification,
    for that long, and opens it again; reads kept the contact fresh meanwhile.

    Two phases through a real ``etcd grpc-proxy``: with etcd sending progress
    notifications every 0.3 s (``--experimental-watch-progress-notify-interval``),
    which the proxy forwards, an idle stream is never abandoned; once they stop
    (etcd restarted without them, so the proxy's upstream watch has none), the same
    idle stream is silent and is re-opened, and the writer still applies the next put.
    """
    import logging

    notify = ["--experimental-watch-progress-notify-interval=300ms"]
    with EtcdServer(extra_args=notify) as srv, EtcdGrpcProxy(srv.endpoint) as px:
        c = connect(srv.endpoint)
        try:
            c.put(f"{prefix}/a", json.dumps(1))
            caplog.set_level(logging.INFO, logger="shmkeyspace")
            w = Writer(shm_name, prefix, endpoints=px.endpoint, stale_after=30.0, watch_silence=1.5)
            w.start()
            try:
                # Phase 1: 4 s idle (more than twice the bound), notifications flowing.
                hp.wait_until(lambda: False, 4.0, interval=0.2)
                assert "delivered nothing" not in caplog.text, caplog.text
                c.put(f"{prefix}/b", json.dumps(2))
                rev = int(c.get_response(b"\0probe").header.revision)
                with Reader(shm_name) as r:
                    assert r.wait_for_revision(rev, 30)
                # Phase 2: no progress notifications any more; the stream goes quiet.
                c.close()
                srv.extra_args = []
                srv.kill()
                srv.start()
                c = connect(srv.endpoint)
                assert hp.wait_until(lambda: caplog.text.count("delivered nothing") >= 2, 60), caplog.text
                assert "abandoning the stream" in caplog.text
                with Reader(shm_name) as r:
                    h = r.health()
                    assert h.writer_alive and not h.stale, h  # reads kept the contact fresh
                c.put(f"{prefix}/c", json.dumps(3))
                rev = int(c.get_response(b"\0probe").header.revision)
                with Reader(shm_name) as r:
                    assert r.wait_for_revision(rev, 30)
                    assert r.get(f"{prefix}/c").decoded == b"3"  # the raw decoder
                assert w.error is None
            finally:
                w.stop()
        finally:
            c.close()
