"""Restarts and removals never give readers older or other data than etcd holds (issue 25).

Real etcd, real writer processes (``shmkeyspace writer``), real reader processes,
real shared memory and state files:

* a writer SIGKILLed under churn and restarted 20 times with the same state dir:
  a reader that records every revision and every key's mod_revision it sees never
  sees either go back (the restarted writer takes its predecessor's image over
  instead of publishing the older state file);
* etcd recreated from an empty data dir under the same flags, with overlapping keys
  at the same revisions: the resume check finds the other history, and once the
  writer says caught up the mirror equals etcd key by key, in a new epoch;
* ``--unlink-on-exit`` + restart, ``shmkeyspace unlink`` + restart, and ``rm`` of the
  control segment under a running writer: readers that only call ``get`` reach the
  new writer's data within a deadline, and two writers never serve one name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading

import helpers_procs as hp
import pytest
import test_cli
from helpers_procs import wait_until

from shmkeyspace import Reader, segment, writerlock
from shmkeyspace.etcd import connect

WriterProc = test_cli.WriterProc
writers = test_cli.writers  # the fixture

# A reader that records what it sees until its stop file exists, then prints a
# JSON summary: every decrease of the revision (within one epoch) and of a key's
# mod_revision is a violation.
MONOTONIC_READER = r"""
import json, os, sys, time
from shmkeyspace import Reader
name, prefix, stop_file = sys.argv[1:4]
keys = [f"{prefix}/k{i:03d}" for i in range(int(sys.argv[4]))]
r = Reader(name, wait=60)
last_rev, last_epoch, seen_mod = 0, None, {}
reads, violations, revisions, pids = 0, [], set(), set()
t_health = 0.0
while not os.path.exists(stop_file):
    with r.snapshot(copy=True) as s:
        rev = s.revision
        got = {k: s.get(k) for k in keys}
    now = time.monotonic()
    if now >= t_health:
        h = r.health()
        t_health = now + 0.05
        pids.add(h.writer_pid)
        if last_epoch is not None and h.epoch != last_epoch:
            last_rev, seen_mod = 0, {}  # a deliberate reset: revisions start over
        last_epoch = h.epoch
    if rev < last_rev:
        violations.append(["revision", last_rev, rev])
    last_rev = max(last_rev, rev)
    revisions.add(rev)
    for k, e in got.items():
        if e is None:
            continue
        if e.mod_revision < seen_mod.get(k, 0):
            violations.append(["mod_revision", k, seen_mod[k], e.mod_revision, rev])
        seen_mod[k] = max(seen_mod.get(k, 0), e.mod_revision)
        if e.decoded["rev_hint"] > rev:
            violations.append(["value newer than its snapshot", k, rev])
    reads += 1
print(json.dumps({"reads": reads, "violations": violations[:20], "n_violations": len(violations),
                  "revisions": len(revisions), "last": last_rev, "pids": sorted(pids)}))
"""

# A reader that calls only get() (no health, no wait) until the key has the wanted
# value, then prints the revision it saw it at and the writer pid it then follows.
GET_UNTIL = r"""
import json, sys, time
from shmkeyspace import Reader
name, key, want, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
r = Reader(name, wait=60)
print("attached", flush=True)
deadline = time.monotonic() + timeout
n = 0
while time.monotonic() < deadline:
    e = r.get(key)
    n += 1
    if e is not None and e.decoded == want:
        print(json.dumps({"revision": r.revision, "gets": n, "pid": r.health().writer_pid}), flush=True)
        sys.exit(0)
    time.sleep(0.001)
print(json.dumps({"timeout": True, "gets": n, "last": None if e is None else e.decoded}), flush=True)
sys.exit(1)
"""


def _start(writers, python_env, tmp_path, endpoint, prefix, name, *extra):
    """A ``shmkeyspace writer --decoder json`` process (tracked in ``writers`` for cleanup)."""
    w = WriterProc(python_env, tmp_path, endpoint, prefix, name, "--decoder", "json", *extra)
    writers.append(w)
    return w


def _etcd_view(c, prefix):
    return {
        meta.key.decode(): (json.loads(value), meta.create_revision, meta.mod_revision, meta.version)
        for value, meta in c.get_prefix(prefix)
    }


def _reader_view(name):
    with Reader(name) as r:
        with r.snapshot() as snap:
            return {
                e.key: (e.decoded, e.create_revision, e.mod_revision, e.version) for e in snap.prefixed("/")
            }


def _health(name):
    with Reader(name) as r:
        return r.health()


def _rev(c) -> int:
    return int(c.get_response(b"\0probe").header.revision)


def test_kill9_under_churn_never_goes_back(etcd_server, prefix, shm_name, python_env, tmp_path, writers):
    """20 SIGKILLs of a persisting writer under churn: no reader sees a revision, or a
    key's mod_revision, go back; after the last restart the mirror equals etcd."""
    d = str(tmp_path / "state")
    nkeys = 20
    c = connect(etcd_server.endpoint)
    stop_churn = threading.Event()
    puts = [0]

    def churn() -> None:
        cc = connect(etcd_server.endpoint)
        try:
            i = 0
            while not stop_churn.is_set():
                k = f"{prefix}/k{i % nkeys:03d}"
                # rev_hint: a lower bound of the put's revision, so a value newer than
                # the snapshot that carries it would show.
                cc.put(k, json.dumps({"i": i, "rev_hint": _rev(cc)}))
                i += 1
                puts[0] = i
                stop_churn.wait(0.003)
        finally:
            cc.close()

    for i in range(nkeys):
        c.put(f"{prefix}/k{i:03d}", json.dumps({"i": -1, "rev_hint": 0}))
    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    stop_file = str(tmp_path / "stop-reader")
    reader = None
    restarts = hp.scaled(20, 100, "SHMKEYSPACE_RESTARTS")
    args = ("--state-dir", d, "--persist-interval", "0.2", "--apply-delay", "5")

    def start():
        return _start(writers, python_env, tmp_path, etcd_server.endpoint, prefix, shm_name, *args)

    try:
        w = start()
        w.wait_published(_rev(c))
        reader = hp.spawn(MONOTONIC_READER, shm_name, prefix, stop_file, str(nkeys))
        for _ in range(restarts):
            # Let the writer publish past what the state file holds, then kill it hard.
            w.wait_published(_rev(c))
            w.stop(signal.SIGKILL)
            w = start()
        stop_churn.set()
        churner.join(30)
        want = _etcd_view(c, prefix)
        w.wait_published(_rev(c))
        assert wait_until(lambda: _health(shm_name).source == "etcd", 60), w.output()
        assert wait_until(lambda: _reader_view(shm_name) == want, 30), w.output()
        # The path under test was taken: a restart found the image in shared memory
        # newer than the state file and took it over. Not every restart does (when
        # the churn stalls, the last file can be as new as the image: then the file
        # is used, by design), so this asks it of the run, not of the last writer.
        logs = [x.output() for x in writers]
        assert any("from the previous writer's shared memory" in lg for lg in logs), logs[-1]
    finally:
        stop_churn.set()
        open(stop_file, "w").close()
        out, err = reader.communicate(timeout=60) if reader is not None else ("", "")
        c.close()
    assert reader.returncode == 0, err[-3000:]
    res = hp.last_json(out)
    assert res["n_violations"] == 0, res
    assert res["reads"] > restarts and res["revisions"] > restarts, res
    assert len(res["pids"]) >= restarts // 2, res  # it followed the restarted writers
    assert puts[0] > restarts, puts


def test_recreated_etcd_is_caught_and_the_mirror_equals_etcd(
    own_etcd, prefix, shm_name, python_env, tmp_path, writers
):
    """Issue 25's reproduction: k1..k3 mirrored and persisted; etcd wiped and started
    again with the same flags (same cluster id); zz, yy, k3 put, so etcd is at the
    file's revision with the file's newest key at the same revisions. The writer must
    find the other history, load, and then equal etcd key by key, in a new epoch."""
    d = str(tmp_path / "state")
    c = connect(own_etcd.endpoint)
    try:
        for k in ("k1", "k2", "k3"):
            c.put(f"{prefix}/{k}", json.dumps(f"old-{k}"))
        rev = _rev(c)
        cluster = int(c.get_response(b"\0probe").header.cluster_id)
    finally:
        c.close()

    def start():
        return _start(
            writers,
            python_env,
            tmp_path,
            own_etcd.endpoint,
            prefix,
            shm_name,
            "--state-dir",
            d,
            "--persist-interval",
            "0.2",
        )

    w = start()
    w.wait_published(rev)
    assert w.stop() == 0  # a clean stop writes the state file
    epoch0 = _health(shm_name).epoch
    own_etcd.kill()
    shutil.rmtree(os.path.join(own_etcd.data_dir, "data"))
    own_etcd.start()
    c = connect(own_etcd.endpoint)
    try:
        for k in ("zz", "yy", "k3"):
            c.put(f"{prefix}/{k}", json.dumps(f"new-{k}"))
        assert int(c.get_response(b"\0probe").header.cluster_id) == cluster
        assert _rev(c) == rev  # the same revision, the newest key at the same revisions
        want = _etcd_view(c, prefix)
        w2 = start()
        assert wait_until(lambda: _health(shm_name).writer_pid == w2.proc.pid, 60), w2.output()
        assert wait_until(lambda: _health(shm_name).source == "etcd", 60), w2.output()
        assert _reader_view(shm_name) == want, w2.output()
        h = _health(shm_name)
        assert h.epoch == epoch0 + 1, (h, w2.output())
        log = w2.output()
        assert "history differs" in log and "full load" in log, log
        # Live afterwards: a new put reaches readers.
        c.put(f"{prefix}/after", json.dumps("after"))
        w2.wait_published(_rev(c))
        assert _reader_view(shm_name) == _etcd_view(c, prefix)
    finally:
        c.close()
    assert w2.stop() == 0


def _get_until(name, key, want, timeout=90):
    p = hp.spawn(GET_UNTIL, name, key, json.dumps(want) if not isinstance(want, str) else want, str(timeout))
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "attached", (line, p.stderr.read() if p.stderr else "")
    return p


def _finish(p):
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, (out, err[-3000:])
    return hp.last_json(out)


@pytest.mark.parametrize("how", ["unlink-on-exit", "shmkeyspace-unlink"])
def test_readers_follow_a_writer_that_recreated_the_segments(
    how, etcd_server, prefix, shm_name, python_env, tmp_path, writers
):
    """The writer's segments removed and made again by the next writer: a reader that
    only calls get() reaches the new writer's data, and Health reports that writer."""
    c = connect(etcd_server.endpoint)
    try:
        key = f"{prefix}/x"
        c.put(key, json.dumps("v1"))
        extra = ["--unlink-on-exit"] if how == "unlink-on-exit" else []
        w1 = _start(writers, python_env, tmp_path, etcd_server.endpoint, prefix, shm_name, *extra)
        w1.wait_published(_rev(c))
        ino1 = os.stat(segment.shm_path(segment.ctrl_name(shm_name))).st_ino
        p = _get_until(shm_name, key, "v2")
        if how == "unlink-on-exit":
            assert w1.stop() == 0
        else:
            w1.stop(signal.SIGKILL)
            res = test_cli.cli(["unlink", shm_name], python_env)
            assert res.returncode == 0, res.stderr
        assert not os.path.exists(segment.shm_path(segment.ctrl_name(shm_name)))
        w2 = _start(writers, python_env, tmp_path, etcd_server.endpoint, prefix, shm_name)
        w2.wait_published(_rev(c))
        assert os.stat(segment.shm_path(segment.ctrl_name(shm_name))).st_ino != ino1
        c.put(key, json.dumps("v2"))
        got = _finish(p)
        assert got["pid"] == w2.proc.pid, got
        assert got["revision"] >= _rev(c), got
    finally:
        c.close()
    assert w2.stop() == 0


def test_rm_of_the_control_segment_stops_its_writer_never_two_writers(
    etcd_server, prefix, shm_name, python_env, tmp_path, writers
):
    """``rm /dev/shm/shmks.NAME`` under a running writer: a second writer cannot start
    while the first holds the lock; the first notices within a heartbeat, retires its
    block and exits 1 with a clear error; the next writer serves the name, and a reader
    that only calls get() follows it."""
    c = connect(etcd_server.endpoint)
    try:
        key = f"{prefix}/x"
        c.put(key, json.dumps("v1"))
        w1 = _start(writers, python_env, tmp_path, etcd_server.endpoint, prefix, shm_name)
        w1.wait_published(_rev(c))
        p = _get_until(shm_name, key, "v2")
        os.unlink(segment.shm_path(segment.ctrl_name(shm_name)))
        # A second writer right away: refused while w1 still holds the lock, or it
        # starts only once w1 has given the name up. Never both serving it.
        w2 = _start(writers, python_env, tmp_path, etcd_server.endpoint, prefix, shm_name)
        assert wait_until(lambda: w1.proc.poll() is not None, 60), w1.output()
        assert w1.proc.returncode == 1, w1.output()
        out1 = w1.output()
        assert "was removed while this writer" in out1 and "two writers never serve one name" in out1, out1
        assert wait_until(lambda: w2.proc.poll() is not None or _writer_pid(shm_name) == w2.proc.pid, 60)
        if w2.proc.poll() is not None:
            assert "already has a live writer" in w2.output(), w2.output()
            w2 = _start(writers, python_env, tmp_path, etcd_server.endpoint, prefix, shm_name)
        w2.wait_published(_rev(c))
        c.put(key, json.dumps("v2"))
        got = _finish(p)
        assert got["pid"] == w2.proc.pid, got
        assert _health(shm_name).writer_alive
    finally:
        c.close()
    assert w2.stop() == 0


def _writer_pid(name):
    try:
        return _health(name).writer_pid
    except Exception:
        return 0


# -- the smaller items ------------------------------------------------------------------

FULL_STATE_DIR = r"""
import json, os, sys, time
from shmkeyspace import Writer
endpoint, prefix, name, d = sys.argv[1:5]
w = Writer(name, prefix, endpoints=endpoint, state_dir=d, persist_interval=0.1)
w.start()
deadline = time.monotonic() + 60
while w.persist_failures < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print("failing", flush=True)
sys.stdin.readline()  # the parent has looked at stat and Health
from shmkeyspace.metrics import WriterCollector
metrics = {m.name: m.samples[0].value for m in WriterCollector(w).collect()}
files = sorted(os.listdir(d))
w.stop()
print(json.dumps({"failures": w.persist_failures, "persists": w.persists, "files": files,
                  "metric": metrics.get("shmkeyspace_writer_persist_failures")}))
"""


def test_a_full_state_dir_shows_in_stat_and_metrics_and_leaves_no_partial_file(
    etcd_server, prefix, shm_name, python_env, tmp_path
):
    """A state dir on a 64 KiB tmpfs and a 300 KiB snapshot: every write fails. The
    failures show in ``stat``, Health and the writer's metrics, and no partly written
    spare file is left behind taking the space."""
    c = connect(etcd_server.endpoint)
    try:
        for i in range(300):
            c.put(f"{prefix}/k{i:03d}", "x" * 1000)
    finally:
        c.close()
    d = str(tmp_path / "state")
    os.mkdir(d, 0o700)
    p = hp.spawn(
        FULL_STATE_DIR,
        etcd_server.endpoint,
        prefix,
        shm_name,
        d,
        prefix=[
            "unshare",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=64k,mode=0700 tmpfs {d} && exec "$0" "$@"',
        ],
        stdin=subprocess.PIPE,
    )
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "failing":
            err = p.stderr.read()  # type: ignore[union-attr]
            if "mount" in err and "permission" in err.lower():
                pytest.skip(f"cannot mount a private tmpfs here: {err.strip()[:200]}")
            raise AssertionError((line, err[-3000:]))
        h = _health(shm_name)
        assert h.persist_failures >= 2 and h.persists == 0 and h.persist_failure_age is not None, h
        stat = test_cli.cli(["stat", shm_name], python_env)
        assert stat.returncode == 0, stat.stderr
        row = [ln for ln in stat.stdout.splitlines() if ln.startswith("state file")]
        assert row and "FAILED" in row[0] and "0 written" in row[0], stat.stdout
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        out, err = p.communicate(timeout=60)
    finally:
        hp.stop(p)
    assert p.returncode == 0, err[-3000:]
    res = hp.last_json(out)
    assert res["failures"] >= 2 and res["persists"] == 0 and res["metric"] >= 2, res
    assert res["files"] == [], res  # no half-written spare (nor anything else) left


def test_a_writer_that_cannot_start_leaves_nothing_in_shared_memory(
    etcd_server, prefix, shm_name, python_env, tmp_path
):
    """A state dir that cannot be created: one error line, exit 1, and no control
    segment (``list`` used to show it as "writer loading?") nor lock file left."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = test_cli.cli(
        [
            "writer",
            "--endpoints",
            etcd_server.endpoint,
            "--prefix",
            prefix,
            "--name",
            shm_name,
            "--state-dir",
            str(blocker / "state"),
        ],
        python_env,
    )
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "state" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert hp.shm_files(shm_name) == []
    assert not os.path.exists(writerlock.lock_path(shm_name))
    listed = test_cli.cli(["list", "--json"], python_env)
    assert shm_name not in listed.stdout


def test_the_systemd_unit_can_write_its_state_dir():
    """ProtectSystem=strict makes / read-only: the unit must create its state dir
    (StateDirectory=) and point the writer at it, or Restart=always loops."""
    path = os.path.join(hp.ROOT, "workers", "shmkeyspace-writer@.service")
    lines = [ln.strip() for ln in open(path) if ln.strip() and not ln.lstrip().startswith("#")]
    kv = {}
    for ln in lines:
        if "=" in ln:
            k, v = ln.split("=", 1)
            kv.setdefault(k, []).append(v)
    assert kv["ProtectSystem"] == ["strict"]
    (state_dir,) = kv["StateDirectory"]
    assert f"SHMKEYSPACE_STATE_DIR=/var/lib/{state_dir}" in kv["Environment"]
    readme = open(os.path.join(hp.ROOT, "workers", "README.md")).read()
    assert "not thread-safe" not in readme
    assert "install -d -m 0755 /etc/shmkeyspace" in readme
