"""Projections (a writer-side transform) and per-prefix byte accounting.

A transform drops fields in the writer, before packing: readers get the
projected value on both read paths, a transform that raises leaves that key out
(logged, recoverable), and a restart under another transform does not take the
old projection over. The writer's running totals per prefix equal a recount of
its builder under random churn (the reference: ``accounting.account``) and the
totals ``shmkeyspace stat --prefixes`` computes from the published snapshot.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_cli import WriterProc

from shmkeyspace import Reader, Writer, accounting, decoders
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.errors import InvalidSettingError
from shmkeyspace.metrics import WriterCollector
from shmkeyspace.reader import IMPLEMENTATIONS
from shmkeyspace.snapshot import pack_entry


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def slim(key, value):
    """The projection the tests use: only host and port; a value without a host is refused."""
    return {"host": value["host"], "port": value.get("port")}


def test_prefix_of_groups_leaves_under_their_directory():
    p = accounting.prefix_of
    assert p(b"/services/a", 2) == b"/services/"
    assert p(b"/services/x/y/z", 2) == b"/services/x/"
    assert p(b"/services/x/y/z", 9) == b"/services/x/y/"
    assert p(b"/services/x/y/z", 0) == b"/"
    assert p(b"plain", 3) == b""
    assert p(b"//double//k", 1) == b"//double/"


def test_running_totals_equal_a_recount_under_random_churn():
    rng = random.Random(7)
    b = ImageBuilder()
    acc = accounting.PrefixBytes(2)
    keys = [f"/r/{d}/{i}".encode() for d in "abcde" for i in range(40)] + [b"/r/top"]
    live = {}
    sizes = acc.before(b, ())
    b.apply_entries({}, 1)
    acc.after(b, sizes)
    for rev in range(2, 300):
        changes = {}
        for k in rng.sample(keys, rng.randint(1, 30)):
            if rng.random() < 0.3:
                changes[k] = None
                live.pop(k, None)
            else:
                v = "x" * rng.randint(0, 300)
                changes[k] = (pack_entry(k, v, 1, rev, 1, 0), rev)
                live[k] = v
        sizes = acc.before(b, changes)
        b.apply_entries(changes, rev)
        acc.after(b, sizes)
        acc._check(b)
    assert sum(t[0] for t in acc.snapshot().values()) == len(live)
    # A new builder (a full load, a restore) is recounted, not patched.
    fresh = ImageBuilder()
    fresh.reset([(k, pack_entry(k, 1, 1, 1, 1, 0)) for k in sorted(keys[:3])], 5)
    acc.after(fresh, acc.before(fresh, ()))
    assert acc.snapshot() == {b"/r/a/": [3, sum(n for _, n in fresh.entry_sizes())]}


def test_transform_projects_values_and_a_raising_one_leaves_the_key_out(
    etcd_server, client, prefix, shm_name, caplog
):
    full = {"host": "10.0.0.1", "port": 80, "blob": "x" * 500, "tags": list(range(50))}
    for n in range(5):
        client.put(f"{prefix}/svc/{n}", json.dumps(dict(full, port=n)))
    client.put(f"{prefix}/svc/nohost", json.dumps({"port": 1}))
    caplog.set_level(logging.WARNING)
    with Writer(
        shm_name,
        prefix,
        endpoints=etcd_server.endpoint,
        decoder=decoders.json,
        transform=slim,
        apply_delay=0.002,
    ) as w:
        w.start()
        assert w.apply_impl == "python"  # a transform is Python code
        assert w.decoder_name == f"shmkeyspace.decoders:json|transform={__name__}:slim"
        assert "svc/nohost" in caplog.text and "transform" in caplog.text
        for impl in IMPLEMENTATIONS:
            with Reader(shm_name, implementation=impl) as r:
                for n in range(5):
                    assert r.get(f"{prefix}/svc/{n}").decoded == {"host": "10.0.0.1", "port": n}, impl
                assert r.get(f"{prefix}/svc/nohost") is None
        # Recoverable: a later valid value is reflected; a new bad one removes the key.
        rev = client.put(f"{prefix}/svc/nohost", json.dumps({"host": "h"})).header.revision
        client.put(f"{prefix}/svc/0", json.dumps({"blob": 1}))
        rev = client.put(f"{prefix}/svc/mark", json.dumps({"host": "m"})).header.revision
        with Reader(shm_name) as r:
            assert r.wait_for_revision(rev, timeout=30)
            assert r.get(f"{prefix}/svc/nohost").decoded == {"host": "h", "port": None}
            assert r.get(f"{prefix}/svc/0") is None
            assert r.get(f"{prefix}/svc/1").decoded == {"host": "10.0.0.1", "port": 1}


def test_a_restart_under_another_transform_does_not_take_the_old_projection_over(
    etcd_server, client, prefix, shm_name, tmp_path
):
    client.put(f"{prefix}/k", json.dumps({"host": "a", "port": 1, "extra": 2}))
    args = dict(
        endpoints=etcd_server.endpoint, decoder=decoders.json, apply_delay=0.002, state_dir=str(tmp_path)
    )
    with Writer(shm_name, prefix, transform=slim, **args) as w:
        w.start()
        w.persist_now()
    with Reader(shm_name) as r:
        assert r.get(f"{prefix}/k").decoded == {"host": "a", "port": 1}
    # Same name, same state dir, no transform: neither the file nor the image in
    # shared memory is this writer's mirror, so it loads from etcd.
    with Writer(shm_name, prefix, **args) as w:
        assert not w.restore()
        w.start()
        with Reader(shm_name) as r:
            _wait(lambda: r.get(f"{prefix}/k").decoded == {"host": "a", "port": 1, "extra": 2})


def test_writer_totals_match_stat_prefixes_and_the_metrics(
    etcd_server, client, prefix, shm_name, tmp_path, python_env
):
    depth = prefix.count("/") + 1  # the directories right under the prefix
    rng = random.Random(3)
    for d in "abc":
        for i in range(30):
            client.put(f"{prefix}/{d}/{i}", "v" * rng.randint(1, 200))
    client.put(f"{prefix}/leaf", "x")
    with Writer(
        shm_name, prefix, endpoints=etcd_server.endpoint, apply_delay=0.002, account_depth=depth
    ) as w:
        w.start()
        for _ in range(200):  # churn: updates, deletes, re-creates
            k = f"{prefix}/{rng.choice('abcd')}/{rng.randint(0, 40)}"
            if rng.random() < 0.3:
                client.delete(k)
            else:
                client.put(k, "w" * rng.randint(0, 400))
        rev = client.put(f"{prefix}/mark", "m").header.revision
        assert w.keyspace.wait_for_revision(rev, timeout=30)
        _wait(lambda: Reader(shm_name).revision >= rev)
        with w.keyspace.lock:
            w.publishing.accounting._check(w.keyspace.key_values.builder)
            mine = w.prefix_bytes()
        assert {p for p, _, _ in mine} >= {f"{prefix}/a/", f"{prefix}/b/", f"{prefix}/c/", f"{prefix}/"}
        out = subprocess.run(
            [sys.executable, "-m", "shmkeyspace", "stat", shm_name, "--prefixes", str(depth), "--json"],
            env=python_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        shown = [(g["prefix"], g["keys"], g["bytes"]) for g in json.loads(out.stdout)["prefixes"]]
        assert shown == mine
        with Reader(shm_name) as r, r.snapshot(copy=True) as snap:
            assert sum(k for _, k, _ in mine) == len(snap)
        registry = CollectorRegistry()
        registry.register(WriterCollector(w, registry))
        text = generate_latest(registry).decode()
        for p, k, b in mine:
            assert f'shmkeyspace_writer_prefix_bytes{{name="{shm_name}",prefix="{p}"}} {float(b)}' in text
            assert f'shmkeyspace_writer_prefix_keys{{name="{shm_name}",prefix="{p}"}} {float(k)}' in text
        table = subprocess.run(
            [sys.executable, "-m", "shmkeyspace", "stat", shm_name, "--prefixes", str(depth)],
            env=python_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0 and f"{prefix}/a/" in table.stdout and "share" in table.stdout


def test_cli_writer_with_transform_and_bad_settings(
    etcd_server, client, prefix, shm_name, tmp_path, python_env
):
    (tmp_path / "proj.py").write_text(
        textwrap.dedent(
            """
            def host_only(key, value):
                return {"host": value["host"]}
            """
        )
    )
    env = dict(python_env, PYTHONPATH=f"{tmp_path}:{python_env.get('PYTHONPATH', '')}")
    client.put(f"{prefix}/s", json.dumps({"host": "h", "big": "y" * 100}))
    w = WriterProc(
        env,
        tmp_path,
        etcd_server.endpoint,
        prefix,
        shm_name,
        "--decoder",
        "json",
        "--transform",
        "proj:host_only",
        "--account-depth",
        "2",
    )
    try:
        w.wait_published()
        with Reader(shm_name) as r:
            assert r.get(f"{prefix}/s").decoded == {"host": "h"}
    finally:
        w.stop()
    for bad, says in (
        (["--transform", "proj:nothing"], "has no callable 'nothing'"),
        (["--transform", "nomodule_xyz:f"], "cannot import module"),
        (["--transform", "justaname"], "use module:function"),
        (["--account-depth", "-1"], "--account-depth"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "shmkeyspace", "writer", "--endpoints", etcd_server.endpoint]
            + ["--prefix", prefix, "--name", shm_name + "x", *bad],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode != 0 and says in p.stderr, (bad, p.stderr)
    with pytest.raises(InvalidSettingError, match="account_depth"):
        Writer(shm_name + "y", prefix, endpoints=etcd_server.endpoint, account_depth=-2)
