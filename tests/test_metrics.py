"""Prometheus metrics: the CLI writer's endpoint and the readers' collector, parsed with prometheus_client."""

from __future__ import annotations

import subprocess
import urllib.request

import helpers_procs as hp
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from shmkeyspace.children import writer_command  # noqa: E402
from shmkeyspace.embedded import free_port  # noqa: E402
from shmkeyspace.metrics import ReaderCollector  # noqa: E402
from shmkeyspace.reader import Reader  # noqa: E402


def _samples(text: str) -> dict:
    """{sample name: value} for the samples labelled with one snapshot name."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name if "le" not in s.labels else f"{s.name}{{le={s.labels['le']}}}"
            out[key] = s.value
    return out


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return _samples(resp.read().decode())


def test_writer_metrics_endpoint(etcd_server, client, prefix, shm_name, tmp_path):
    for i in range(20):
        client.put(f"{prefix}/k{i:02d}", '{"i": %d}' % i)
    client.put(f"{prefix}/bad", "not json")
    port = free_port()
    log = open(tmp_path / "writer.log", "wb")
    proc = subprocess.Popen(
        [
            *writer_command(etcd_server.endpoint, prefix, shm_name, python=hp.PYTHON),
            "--decoder",
            "json",
            "--apply-delay",
            "2",
            "--metrics-port",
            str(port),
        ],
        env=hp.child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        r = Reader(shm_name, wait=60)
        rev = int(client.put(f"{prefix}/k00", '{"i": 100}').header.revision)
        client.delete(f"{prefix}/k01")
        rev = int(client.put(f"{prefix}/k02", '{"i": 102}').header.revision)
        assert r.wait_for_revision(rev, 30)

        def scraped():
            try:
                m = _scrape(port)
            except OSError:
                return None
            return m if m.get("shmkeyspace_writer_published_revision") == rev else None

        assert hp.wait_until(lambda: scraped() is not None, 30), (tmp_path / "writer.log").read_text()
        m = scraped()
        assert m["shmkeyspace_writer_keys"] == len(r) == 19
        assert m["shmkeyspace_writer_bytes"] == r.health().bytes > 0
        assert m["shmkeyspace_writer_etcd_revision"] >= rev
        assert m["shmkeyspace_writer_lag_revisions"] >= 0
        assert m["shmkeyspace_writer_publications_total"] >= 2
        assert m["shmkeyspace_writer_publish_failures_total"] == 0
        assert m["shmkeyspace_writer_events_applied_total"] >= 2
        assert m["shmkeyspace_writer_decode_failures_total"] == 1  # "not json"
        assert m["shmkeyspace_writer_reloads_total"] == 0
        assert m["shmkeyspace_writer_etcd_contact_age_seconds"] >= 0
        assert m["shmkeyspace_writer_publish_seconds_count"] >= 1  # the load and the updates
        assert (
            m["shmkeyspace_writer_publish_seconds_bucket{le=+Inf}"]
            == m["shmkeyspace_writer_publish_seconds_count"]
        )
        r.close()
    finally:
        hp.stop(proc)
        log.close()


def test_reader_collector(etcd_server, client, prefix, shm_name):
    from shmkeyspace.writer import Writer

    reg = CollectorRegistry()
    coll = ReaderCollector(shm_name)
    reg.register(coll)
    m = _samples(generate_latest(reg).decode())
    assert m == {"shmkeyspace_reader_writer_alive": 0}  # nothing published yet
    client.put(f"{prefix}/a", "1")
    with Writer(shm_name, prefix, client=client, apply_delay=0.002) as w:
        w.start()
        with Reader(shm_name) as r:
            assert hp.wait_until(
                lambda: _samples(generate_latest(reg).decode())["shmkeyspace_reader_writer_alive"] == 1, 30
            )
            m = _samples(generate_latest(reg).decode())
            assert m["shmkeyspace_reader_revision"] == r.revision
            assert m["shmkeyspace_reader_keys"] == 1
            assert 0 <= m["shmkeyspace_reader_heartbeat_age_seconds"] < 60
            assert m["shmkeyspace_reader_bytes"] > 0
    # The writer stopped: the collector says so.
    assert hp.wait_until(
        lambda: _samples(generate_latest(reg).decode())["shmkeyspace_reader_writer_alive"] == 0, 30
    )
    coll.close()


def test_publish_observers_run_in_order_and_one_that_raises_stops_nothing(
    etcd_server, client, prefix, shm_name
):
    """One callback mechanism (issue 24): ``on_publish`` is the first observer,
    ``add_publish_observer`` adds more; an observer that raises is logged and the
    others, and the writer, go on. The metrics collector observes the same way."""
    from shmkeyspace import Writer
    from shmkeyspace.metrics import WriterCollector

    client.put(f"{prefix}/a", "1")
    calls = []

    def boom(stats):
        calls.append(("boom", stats.revision))
        raise RuntimeError("observer failure")

    w = Writer(shm_name, prefix, endpoints=etcd_server.endpoint, on_publish=boom)
    w.add_publish_observer(lambda stats: calls.append(("second", stats.revision)))
    registry = CollectorRegistry()
    collector = WriterCollector(w, registry)
    try:
        w.start()
        rev = int(client.put(f"{prefix}/b", "2").header.revision)
        with Reader(shm_name) as r:
            assert r.wait_for_revision(rev, 30)
        assert hp.wait_until(lambda: ("second", rev) in calls, 30), calls
        i = calls.index(("second", rev))
        assert calls[i - 1] == ("boom", rev), calls  # in order, the raising one first
        assert w.error is None
        hist = {m.name: m for m in collector.collect()}
        assert "shmkeyspace_writer_publications" in hist
        seen = _samples(generate_latest(registry).decode())
        assert seen["shmkeyspace_writer_publish_seconds_count"] >= 1, seen  # it observed publications
    finally:
        w.stop()
        collector.close()
