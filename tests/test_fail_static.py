"""Fail static: the writer's state file, warm start and resume, with real etcd and processes.

Each test runs ``shmkeyspace writer --state-dir`` as a real process against a
private etcd that it kills, restarts, compacts or replaces, and checks what
readers see against etcd itself, key by key:

* reboot: writer killed, segments unlinked, etcd down -> the restarted writer
  serves the persisted data (source "disk"); etcd back -> it resumes from the
  file's revision without a full load and readers equal etcd (source "etcd");
* etcd compacted past the file's revision -> exactly one full load;
* a new etcd cluster (fresh data dir, same flags, hence the same cluster id)
  with more history than the file -> the file is discarded, readers equal it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import test_cli
from helpers_procs import wait_until

from shmkeyspace import Reader, state, writerlock
from shmkeyspace.etcd import connect

PERSIST = "0.2"
FULL_LOAD = "full load #"  # the writer logs every full load after a restore with this
RESUMED = "no full load"
WriterProc = test_cli.WriterProc
writers = test_cli.writers  # the fixture


def _put_many(c, prefix, names, tag):
    for n in names:
        c.put(f"{prefix}/{n}", json.dumps({"n": n, "tag": tag}))


def _etcd_view(c, prefix):
    out = {}
    for value, meta in c.get_prefix(prefix):
        out[meta.key.decode()] = (json.loads(value), meta.create_revision, meta.mod_revision, meta.version)
    return out


def _reader_view(name):
    with Reader(name) as r:
        with r.snapshot() as snap:
            return {
                e.key: (e.decoded, e.create_revision, e.mod_revision, e.version) for e in snap.prefixed("/")
            }


def _file_revision(d, name, prefix):
    try:
        return state.read(d, name, prefix, "json").revision
    except (OSError, ValueError):
        return 0


def _persisted_writer(python_env, tmp_path, etcd, c, prefix, name, d, writers):
    """A writer that mirrored 40 keys and persisted them; returns (writer, file revision)."""
    _put_many(c, prefix, [f"k{i:03d}" for i in range(40)], "a")
    w = _restart(python_env, tmp_path, etcd, prefix, name, d, writers)
    rev = int(c.get_response(b"\0probe").header.revision)
    w.wait_published(rev)
    assert wait_until(lambda: _file_revision(d, name, prefix) == rev, 30), w.output()
    return w, rev


def _restart(python_env, tmp_path, etcd, prefix, name, d, writers):
    """A writer of ``name`` with the state dir ``d`` (tracked in ``writers`` for cleanup)."""
    w = WriterProc(
        python_env,
        tmp_path,
        etcd.endpoint,
        prefix,
        name,
        "--decoder",
        "json",
        "--state-dir",
        d,
        "--persist-interval",
        PERSIST,
    )
    writers.append(w)
    return w


def _kill_and_unlink(w, name):
    w.stop(signal.SIGKILL)
    writerlock.unlink_all(name)  # a reboot empties /dev/shm


def _health(name):
    with Reader(name) as r:
        return r.health()


def test_reboot_serves_disk_then_resumes_without_full_load(
    own_etcd, prefix, shm_name, python_env, tmp_path, writers
):
    d = str(tmp_path / "state")
    c = connect(own_etcd.endpoint)
    try:
        w, rev = _persisted_writer(python_env, tmp_path, own_etcd, c, prefix, shm_name, d, writers)
        persisted = _etcd_view(c, prefix)
        _kill_and_unlink(w, shm_name)
        # Missed while the writer is down: puts, an overwrite and a delete.
        _put_many(c, prefix, [f"late{i}" for i in range(20)], "b")
        _put_many(c, prefix, ["k000"], "b")
        c.delete(f"{prefix}/k001")
        last_prefix_event = int(c.get_response(b"\0probe").header.revision)
        # A write elsewhere last: etcd's revision passes the prefix's newest event,
        # so "caught up" needs the greatest mod_revision under the prefix (_find_top).
        c.put("/elsewhere/x", "1")
    finally:
        c.close()
    own_etcd.kill()

    w2 = _restart(python_env, tmp_path, own_etcd, prefix, shm_name, d, writers)
    w2.wait_published(rev)
    assert _reader_view(shm_name) == persisted
    h = _health(shm_name)
    assert (h.source, h.revision, h.writer_alive) == ("disk", rev, True), w2.output()
    stat = test_cli.cli(["stat", shm_name], python_env)
    assert stat.returncode == 0 and "source" in stat.stdout and "disk" in stat.stdout, stat

    own_etcd.start()
    c = connect(own_etcd.endpoint)
    try:
        want = _etcd_view(c, prefix)
        now = int(c.get_response(b"\0probe").header.revision)
        assert wait_until(lambda: _health(shm_name).source == "etcd", 60), w2.output()
        assert _reader_view(shm_name) == want
        h = _health(shm_name)
        assert h.revision == last_prefix_event < now, h
        assert wait_until(lambda: _health(shm_name).etcd_revision >= now, 30), (
            _health(shm_name),
            w2.output(),
        )
        log = w2.output()
        assert RESUMED in log and f"revision {rev}" in log, log
        assert FULL_LOAD not in log and "loaded" not in log, log
        # Live again: a new put reaches readers, and the file follows.
        c.put(f"{prefix}/after", json.dumps({"n": "after", "tag": "c"}))
        after = int(c.get_response(b"\0probe").header.revision)
        w2.wait_published(after)
        assert wait_until(lambda: _file_revision(d, shm_name, prefix) == after, 30), w2.output()
        assert _reader_view(shm_name) == _etcd_view(c, prefix)
        # A clean exit right after a publication leaves that publication on disk.
        last = c.put(f"{prefix}/last", json.dumps({"n": "last", "tag": "d"})).header.revision
        w2.wait_published(last)
    finally:
        c.close()
    assert w2.stop() == 0
    assert _file_revision(d, shm_name, prefix) == last


def test_compacted_past_the_file_means_one_full_load(
    own_etcd, prefix, shm_name, python_env, tmp_path, writers
):
    d = str(tmp_path / "state")
    c = connect(own_etcd.endpoint)
    try:
        w, rev = _persisted_writer(python_env, tmp_path, own_etcd, c, prefix, shm_name, d, writers)
        _kill_and_unlink(w, shm_name)
        _put_many(c, prefix, [f"late{i}" for i in range(10)], "b")
        c.delete(f"{prefix}/k002")
        now = int(c.get_response(b"\0probe").header.revision)
        c.compact(now)
        w2 = _restart(python_env, tmp_path, own_etcd, prefix, shm_name, d, writers)
        w2.wait_published(now)
        assert wait_until(lambda: _health(shm_name).source == "etcd", 60), w2.output()
        assert _reader_view(shm_name) == _etcd_view(c, prefix)
        log = w2.output()
        assert log.count(FULL_LOAD) == 1, log
        assert "compacted" in log, log
    finally:
        c.close()
    assert w2.stop() == 0


def test_new_cluster_discards_the_file(own_etcd, prefix, shm_name, python_env, tmp_path, writers):
    d = str(tmp_path / "state")
    c = connect(own_etcd.endpoint)
    try:
        w, rev = _persisted_writer(python_env, tmp_path, own_etcd, c, prefix, shm_name, d, writers)
        cluster = int(c.get_response(b"\0probe").header.cluster_id)
    finally:
        c.close()
    _kill_and_unlink(w, shm_name)
    # A new cluster: fresh data dir, same flags (so, measured, the same cluster id),
    # and more history than the file, with other keys.
    own_etcd.kill()
    shutil.rmtree(os.path.join(own_etcd.data_dir, "data"))
    own_etcd.start()
    c = connect(own_etcd.endpoint)
    try:
        _put_many(c, prefix, [f"other{i:03d}" for i in range(rev + 5)], "new")
        assert int(c.get_response(b"\0probe").header.cluster_id) == cluster
        now = int(c.get_response(b"\0probe").header.revision)
        w2 = _restart(python_env, tmp_path, own_etcd, prefix, shm_name, d, writers)
        w2.wait_published(now)
        assert wait_until(lambda: _health(shm_name).source == "etcd", 60), w2.output()
        assert _reader_view(shm_name) == _etcd_view(c, prefix)
        log = w2.output()
        assert "discarded" in log and "history differs" in log, log
        assert log.count(FULL_LOAD) == 1, log
        assert wait_until(lambda: _file_revision(d, shm_name, prefix) == now, 30), w2.output()
    finally:
        c.close()
    assert w2.stop() == 0


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_bad_state_file_falls_back_to_etcd(own_etcd, prefix, shm_name, python_env, tmp_path, writers, damage):
    d = str(tmp_path / "state")
    c = connect(own_etcd.endpoint)
    try:
        w, rev = _persisted_writer(python_env, tmp_path, own_etcd, c, prefix, shm_name, d, writers)
        assert w.stop() == 0
        writerlock.unlink_all(shm_name)
        path = state.path_for(d, shm_name)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2] if damage == "truncated" else b"#!/bin/sh\nrm -rf /\n")
        w2 = _restart(python_env, tmp_path, own_etcd, prefix, shm_name, d, writers)
        w2.wait_published(rev)
        assert _health(shm_name).source == "etcd"
        assert _reader_view(shm_name) == _etcd_view(c, prefix)
        log = w2.output()
        assert "state file ignored" in log, log
    finally:
        c.close()
    assert w2.stop() == 0
