"""Full loads that survive a slow etcd (load.py, Writer.load): against a real etcd.

The slow page is a real one: the test's own etcd is frozen (SIGSTOP) between
two pages, so the next page's request times out whatever the machine's speed,
and thawed once the load has said it is waiting to retry.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest
from helpers_procs import wait_until

from shmkeyspace import decoders
from shmkeyspace.children import put_many
from shmkeyspace.embedded import EtcdGrpcProxy
from shmkeyspace.errors import LoadFailedError
from shmkeyspace.etcd import connect
from shmkeyspace.keyspace import KeySpace
from shmkeyspace.load import PAGE_TRIES
from shmkeyspace.writer import Writer

N = 9000
PAGE = 4000  # every page asks 4000 keys: a timed-out one is asked again with 2000


def seed(client, root: str, n: int = N) -> int:
    put_many(client, ((f"{root}/k{i:05d}", json.dumps({"i": i})) for i in range(n)), batch=100)
    return int(client.get_response(b"\0").header.revision)


def etcd_rows(client, root: str, rev: int):
    resp = client.get_range_response(root.encode(), root.encode()[:-1] + b"0", revision=rev)
    return [(bytes(kv.key), bytes(kv.value), int(kv.mod_revision)) for kv in resp.kvs]


def mirror_rows(ks):
    return [(kv.key, kv.value, kv.mod_revision) for kv in ks.key_values]


def thaw_when_waiting(etcd, status) -> threading.Thread:
    """Thaw ``etcd`` once the load has counted a page retry (it is in its backoff then)."""

    def run() -> None:
        try:
            wait_until(lambda: status.page_retries >= 1, 60, 0.01)
        finally:
            etcd.thaw()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_slow_page_is_retried_smaller_at_the_same_revision(own_etcd, prefix, caplog):
    root = f"{prefix}/slow"
    c = connect(own_etcd.endpoint)
    slow = connect(own_etcd.endpoint, timeout=1.0)  # the load's client: a 1 s request timeout
    try:
        rev = seed(c, root)
        ks = KeySpace(root, decoders.raw)
        caplog.set_level(logging.INFO, logger="shmkeyspace.load")
        thawer = None

        def progress(n: int) -> None:
            nonlocal thawer
            if thawer is None:
                # After the first page: a write the pinned load must not see, then
                # a frozen etcd, so a later page times out.
                c.put(f"{root}/k00001", "changed after the load's revision")
                own_etcd.freeze()
                thawer = thaw_when_waiting(own_etcd, ks.load_status)

        ks.load(slow, page_size=PAGE, progress=progress)
        assert thawer is not None
        thawer.join(60)
        st = ks.load_status
        assert st.page_retries >= 1 and st.state == "idle"
        retries = [r.getMessage() for r in caplog.records if "try 2 of" in r.getMessage()]
        assert retries and all(f"with {PAGE // 2} keys in " in m for m in retries)
        assert ks.header.revision == rev  # pinned: every page at the first page's revision
        assert mirror_rows(ks) == etcd_rows(c, root + "/", rev)
        assert len(ks.key_values) == N
    finally:
        own_etcd.thaw()
        slow.close()
        c.close()


@pytest.fixture
def quick_backoff(monkeypatch):
    """Shorter backoffs (the same code paths, a shorter test)."""
    from shmkeyspace import load, writer

    monkeypatch.setattr(load, "PAGE_BACKOFF", 0.3)
    monkeypatch.setattr(load, "PAGE_BACKOFF_MAX", 0.5)
    monkeypatch.setattr(writer, "LOAD_BACKOFF", 0.2)
    monkeypatch.setattr(writer, "LOAD_BACKOFF_MAX", 0.5)


def test_page_out_of_tries_fails_the_load_clearly(own_etcd, prefix, quick_backoff):
    """A page that never answers: PAGE_TRIES tries, then LoadFailedError (the caller restarts)."""
    root = f"{prefix}/dead"
    c = connect(own_etcd.endpoint)
    fast = connect(own_etcd.endpoint, timeout=0.3)
    try:
        seed(c, root, 3000)
        ks = KeySpace(root, decoders.raw)

        def progress(n: int) -> None:
            own_etcd.freeze()

        with pytest.raises(LoadFailedError) as ei:
            ks.load(fast, page_size=1000, progress=progress)
        assert ei.value.keys >= 1000
        assert f"failed {PAGE_TRIES} times" in str(ei.value)
        assert ks.load_status.page_retries >= PAGE_TRIES - 1
        assert len(ks.key_values) == 0  # nothing half-loaded was swapped in
    finally:
        own_etcd.thaw()
        fast.close()
        c.close()


def test_range_stream_falls_back_to_pages_on_etcd_35(own_etcd, prefix):
    """etcd 3.5 (and its gRPC proxy) answer RangeStream UNIMPLEMENTED: pages, and not asked again."""
    root = f"{prefix}/fallback"
    c = connect(own_etcd.endpoint)
    try:
        rev = seed(c, root, 2000)
        for endpoint, proxy in ((own_etcd.endpoint, None), (None, EtcdGrpcProxy(own_etcd.endpoint))):
            if proxy is not None:
                proxy.start()
                endpoint = proxy.endpoint
            lc = connect(endpoint)
            try:
                ks = KeySpace(root, decoders.raw)
                ks.load(lc)
                assert not ks.load_status.streamed
                assert getattr(lc, "_shmkeyspace_no_range_stream", False)  # remembered per client
                assert mirror_rows(ks) == etcd_rows(c, root + "/", rev)
                ks.load(lc)  # the second load goes straight to pages
                assert len(ks.key_values) == 2000
            finally:
                lc.close()
                if proxy is not None:
                    proxy.stop()
    finally:
        c.close()


def test_writer_restarts_a_failed_load_after_a_backoff_and_says_so(
    own_etcd, prefix, shm_name, python_env, quick_backoff
):
    """A load out of page tries is started again (jittered backoff) until it succeeds;
    meanwhile ``shmkeyspace stat`` shows the load waiting, and the metrics count it."""
    root = f"{prefix}/w"
    c = connect(own_etcd.endpoint)
    w = None
    try:
        seed(c, root, 3000)
        w = Writer(shm_name, root, endpoints=own_etcd.endpoint, connect_args={"timeout": 0.3})
        st = w.load_status
        w.connect()
        own_etcd.freeze()  # every page times out: the first load runs out of tries
        t = threading.Thread(target=w.load, daemon=True)
        t.start()
        wait_until(lambda: st.restarts >= 1, 60, 0.01)
        # The control block says so (stat works before anything is published).
        out = subprocess.run(
            [sys.executable, "-m", "shmkeyspace", "stat", shm_name, "--json"],
            capture_output=True,
            text=True,
            env=python_env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["published"] is False and info["load_restarts"] >= 1
        assert info["load_state"] in ("waiting", "loading")
        from prometheus_client import CollectorRegistry

        from shmkeyspace.metrics import WriterCollector

        reg = CollectorRegistry()
        reg.register(WriterCollector(w, reg))
        assert reg.get_sample_value("shmkeyspace_writer_loading", {"name": shm_name}) == 1
        assert reg.get_sample_value("shmkeyspace_writer_load_restarts_total", {"name": shm_name}) >= 1
        own_etcd.thaw()
        t.join(120)
        assert w.loaded.is_set() and w.key_count == 3000
        assert reg.get_sample_value("shmkeyspace_writer_loading", {"name": shm_name}) == 0
        text = subprocess.run(
            [sys.executable, "-m", "shmkeyspace", "stat", shm_name],
            capture_output=True,
            text=True,
            env=python_env,
            timeout=60,
        ).stdout
        assert "full load" in text and "loads restarted" in text
    finally:
        own_etcd.thaw()
        if w is not None:
            w.stop()
        c.close()
