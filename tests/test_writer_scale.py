"""The writer's load and publication mechanics (issue 11), against a real etcd.

* a load across many pages at one revision, while writes continue between pages,
  equals etcd at that revision key by key (KeySpace's KeyValues and the writer's
  packed store alike);
* a publication that fails (the image size limit) leaves the writer up, readers on
  the last whole snapshot, and is retried until it succeeds;
* the Writer lifecycle: run() raises its fatal error and keeps it in .error;
  on_publish sees every publication with the keys it changed.
"""

from __future__ import annotations

import json
import threading

import helpers_procs as hp
import pytest
from test_keyspace import assert_mirror_equals_etcd, etcd_revision, etcd_rows, txn_revision

from shmkeyspace import Reader, Writer, decoders
from shmkeyspace.errors import ImageTooLargeError
from shmkeyspace.keyspace import KeySpace, KeySpaceError
from shmkeyspace.snapshot import entry_key


def _seed(client, root: str, n: int) -> None:
    for start in range(0, n, 100):
        client.transaction(
            compare=[],
            failure=[],
            success=[
                client.transactions.put(f"{root}/k{i:05d}", json.dumps({"i": i, "v": 0}))
                for i in range(start, min(n, start + 100))
            ],
        )


def _churn(client, root: str):
    """A progress callback that writes between pages: updates ahead of the load,
    a delete, a new key, so later pages at the pinned revision must not see them."""
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        i = len(calls)
        client.put(f"{root}/k{(n + 5 * i) % 1500:05d}", json.dumps({"i": -1, "v": i}))
        client.delete(f"{root}/k{(n + 7 * i + 3) % 1500:05d}")
        client.put(f"{root}/k{n:05d}x{i}", json.dumps({"new": i}))

    return progress, calls


def test_load_many_pages_at_one_revision_while_writes_continue(client, prefix):
    root = f"{prefix}/pages"
    _seed(client, root, 1500)
    progress, calls = _churn(client, root)
    ks = KeySpace(root, decoders.json)
    ks.load(client, page_size=37, progress=progress)
    assert len(calls) >= 1500 // 37, calls  # many pages
    rev = assert_mirror_equals_etcd(ks, client)
    # The writes between pages happened after the pinned revision (and are many).
    assert etcd_revision(client) >= rev + 2 * len(calls)
    assert etcd_rows(client, ks.root_key) != etcd_rows(client, ks.root_key, rev)


def test_writer_load_many_pages_equals_etcd_at_its_revision(client, prefix, shm_name):
    """The same through the writer's packed store, read back through a Reader."""
    root = f"{prefix}/wpages"
    _seed(client, root, 1500)
    client.put(f"{root}/bad", "not json")  # excluded by the decoder, like any load
    progress, calls = _churn(client, root)
    with Writer(shm_name, root, client=client, decoder=decoders.json) as w:
        w.keyspace.load(client, page_size=41, progress=progress)
        assert len(calls) >= 1500 // 41
        rev = w.revision
        with Reader(shm_name) as r, r.snapshot(copy=True) as snap:
            assert snap.revision == rev
            mine = [
                (e.key, e.decoded, e.create_revision, e.mod_revision, e.version, e.lease)
                for e in snap.range(b"", None)
            ]
    theirs = [
        (entry_key(k), json.loads(v), c, m, ver, lease)
        for k, v, c, m, ver, lease in etcd_rows(client, (root).encode(), rev)
        if v != b"not json"
    ]
    assert mine == theirs
    assert etcd_revision(client) > rev


def _pair_txn(client, root: str, value: str) -> int:
    ok, resps = client.transaction(
        compare=[],
        failure=[],
        success=[client.transactions.put(f"{root}/a", value), client.transactions.put(f"{root}/b", value)],
    )
    return txn_revision(resps)


def test_publish_failure_keeps_writer_up_and_readers_whole(client, prefix, shm_name):
    """The image limit refuses a publication: the writer stays up, counts it, readers
    keep the last whole snapshot (a and b, written together, always agree), later
    changes stay pending, and publishing resumes when the image fits again (without
    waiting for another etcd event: the heartbeat retries)."""
    root = f"{prefix}/fail"
    _pair_txn(client, root, "v0")
    published = []
    w = Writer(
        shm_name,
        root,
        client=client,
        decoder=decoders.utf8,
        apply_delay=0.005,
        heartbeat_interval=0.05,
        on_publish=published.append,
    ).start()
    seen = []
    bad = []
    stop = threading.Event()

    def watch_reader() -> None:
        with Reader(shm_name, cache_size=0) as r:
            while not stop.is_set():
                with r.snapshot(copy=True) as s:
                    a, b = s.get(f"{root}/a"), s.get(f"{root}/b")
                    if a is None or b is None or a.decoded != b.decoded:
                        bad.append((s.revision, a, b))
                    seen.append(s.revision)

    t = threading.Thread(target=watch_reader, daemon=True)
    t.start()
    try:
        assert hp.wait_until(lambda: len(seen) > 10, 30)
        w.max_image_bytes = published[-1].image_bytes + 4096
        failures = w.publish_failures
        big_rev = client.put(f"{root}/big", "x" * 20000).header.revision
        assert hp.wait_until(lambda: w.publish_failures > failures, 30)
        pair_rev = _pair_txn(client, root, "v1")  # applied to the state, not publishable yet
        assert hp.wait_until(lambda: w.revision >= pair_rev, 30)
        with Reader(shm_name) as r:
            assert r.revision < big_rev
            assert r.get(f"{root}/a").decoded == "v0" and r.get(f"{root}/big") is None
            assert r.health().writer_alive
        assert w.error is None and not w.wait(0)

        # Raising the limit is enough: the heartbeat publishes the pending state.
        n = len(published)
        w.max_image_bytes = 1 << 30
        assert hp.wait_until(lambda: len(published) > n, 30)
        with Reader(shm_name) as r:
            assert r.revision == pair_rev
            assert r.get(f"{root}/a").decoded == "v1" and len(r.get(f"{root}/big").decoded) == 20000

        # Too big again; deleting the big value makes the next update fit.
        w.max_image_bytes = published[-1].image_bytes + 1024
        client.put(f"{root}/big", "y" * 30000)
        failures = w.publish_failures
        assert hp.wait_until(lambda: w.publish_failures > failures, 30)
        client.delete(f"{root}/big")
        last = _pair_txn(client, root, "v2")
        with Reader(shm_name) as r:
            assert r.wait_for_revision(last, 30)
            assert r.get(f"{root}/big") is None and r.get(f"{root}/a").decoded == "v2"
            assert_snapshot_equals_etcd(r, client, root, decode=bytes.decode)
    finally:
        stop.set()
        t.join(10)
        w.stop()
    assert bad == [], bad[:5]
    assert seen == sorted(seen)  # a reader never goes back in time
    assert w.publish_failures >= 2 and w.error is None


def assert_snapshot_equals_etcd(r: Reader, client, root: str, decode) -> None:
    with r.snapshot(copy=True) as s:
        mine = [(e.key, e.decoded, e.mod_revision) for e in s.range(root, None)]
        theirs = [
            (entry_key(k), decode(v), m) for k, v, _, m, _, _ in etcd_rows(client, root.encode(), s.revision)
        ]
    assert mine == theirs


def test_on_publish_reports_changed_keys(client, prefix, shm_name):
    root = f"{prefix}/hook"
    client.put(f"{root}/a", "1")
    got = []
    with Writer(shm_name, root, client=client, apply_delay=0.2, on_publish=got.append).start() as w:
        assert got and got[0].changed_keys is None and got[0].keys == 1  # the load: everything
        _, resps = client.transaction(
            compare=[],
            failure=[],
            success=[client.transactions.put(f"{root}/b", "2"), client.transactions.delete(f"{root}/a")],
        )
        rev = txn_revision(resps)
        assert hp.wait_until(lambda: got[-1].revision >= rev, 30)
        assert set(got[-1].changed_keys) == {f"{root}/a".encode(), f"{root}/b".encode()}
        assert got[-1].keys == 1 and w.key_count == 1
        assert got[-1].publications == w.publications


def test_run_raises_its_fatal_error_and_keeps_it(client, prefix, shm_name):
    """An unrecoverable error (another cluster's header) ends run() with that error,
    kept in Writer.error; start()'s thread ends; stop() is still clean."""
    root = f"{prefix}/fatal"
    client.put(f"{root}/a", "1")
    w = Writer(shm_name, root, client=client).start()
    try:
        with w.keyspace.lock:
            hdr = w.keyspace.header
            w.keyspace.header = type(hdr)(hdr.cluster_id + 1, hdr.member_id, hdr.revision, hdr.raft_term)
        client.put(f"{root}/b", "2")
        assert w.wait(30)
        assert isinstance(w.error, KeySpaceError) and "ClusterId" in str(w.error)
    finally:
        w.stop()


def test_image_too_large_error_type():
    assert issubclass(ImageTooLargeError, ValueError)


def test_writer_scale_bench_smoke(tmp_path):
    """./run bench --only writer_scale --smoke (bench/scenarios/writer_scale.py) runs end to end and writes well-formed results
    (shape and sanity only: never whether a target is met)."""
    import math
    import os
    import subprocess

    from conftest import PYTHON, ROOT

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            PYTHON,
            os.path.join(ROOT, "bench", "run.py"),
            "--only",
            "writer_scale",
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "writer_scale.json").read_text())["results"]["10000"]
    assert "| writer spawn" in (tmp_path / "writer_scale.md").read_text()
    for v in (
        res["startup_s"],
        res["image_mib"],
        res["writer_uss_mib"],
        res["burst"]["ratio"],
        res["reload"]["s"],
    ):
        assert isinstance(v, float) and math.isfinite(v) and v > 0, res
    assert res["raw_fetch"]["best_s"] <= res["raw_fetch"]["unlimited_s"]
    assert res["reload"]["old_snapshot_served"] and res["reload"]["equal_to_etcd"], res["reload"]
    assert res["one_key"]["cpu_ms_median"] >= 0


JSON_CASES = [
    b'{"a":1}',
    b"NaN",
    b"[1e400]",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"9223372036854775807",
    b'"\\ud800"',
    b'{"a":1,"a":2}',
    b"1.0000000000000002",
    b"  [1] ",
    b"-0.0",
    b'"\\u00e9\\n"',
    b'{"id":"12345678901234567890123"}',
    b"1e-400",
    b"\xef\xbb\xbf{}",
    b"{bad",
    b"\xff",
    b"",
]


@pytest.mark.parametrize("raw", JSON_CASES)
def test_json_decoder_is_json_loads(raw):
    """decoders.json's orjson fast path answers exactly what json.loads does (or fails alike)."""
    from shmkeyspace.key_values import KeyValue

    def outcome(fn):
        try:
            return repr(fn())
        except (ValueError, UnicodeDecodeError) as exc:
            return type(exc).__name__

    mine = outcome(lambda: decoders.json(KeyValue(b"/k", raw, 1, 1, 1, 0, None)))
    assert mine == outcome(lambda: json.loads(raw.decode("utf-8")))
