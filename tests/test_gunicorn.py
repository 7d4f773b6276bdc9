"""gunicorn fleet integration, end to end: real gunicorn, real workers, real etcd.

Proves, with workers/gunicorn.conf.py and examples/wsgi_app.py unchanged:
* the master starts ONE writer; every worker (>= 4) answers from the snapshot
  and sees a put; etcd's own metrics show one watch for the whole fleet;
* a SIGKILLed worker is respawned by gunicorn and the new one answers correctly;
* a SIGKILLed writer is restarted by the master's monitor while the workers keep
  serving the last snapshot, and then see new puts, without being restarted;
* SIGTERM to the master stops the writer too;
* an external writer (SHMKEYSPACE_EXTERNAL_WRITER=1) is used as is; a writer
  already running when gunicorn starts is stood by for and taken over from when
  it exits; an unreachable etcd makes gunicorn fail at start with a clear message.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import PYTHON, ROOT
from helpers_procs import shm_files, wait_until

from shmkeyspace import Reader, Writer, segment, writerlock
from shmkeyspace.embedded import free_port
from shmkeyspace.etcd import connect

CONF = os.path.join(ROOT, "workers", "gunicorn.conf.py")
EXAMPLES = os.path.join(ROOT, "examples")
WORKERS = 4


def _gunicorn_supports(flag: str) -> bool:
    out = subprocess.run([PYTHON, "-m", "gunicorn", "--help"], capture_output=True, text=True).stdout
    return flag in out


class Gunicorn:
    def __init__(self, env, tmp_path, workers=WORKERS, extra_args=(), cwd=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        args = [
            PYTHON,
            "-m",
            "gunicorn",
            "-c",
            CONF,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(workers),
            "--pythonpath",
            EXAMPLES,
            "--timeout",
            "120",
            "--graceful-timeout",
            "10",
        ]
        if _gunicorn_supports("--no-control-socket"):
            args.append("--no-control-socket")  # gunicorn >= 24: no shared ~/.gunicorn socket between tests
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args + list(extra_args) + ["wsgi_app:application"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(cwd or tmp_path),
            )
        self.master = psutil.Process(self.proc.pid)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def request(self, path, timeout=10):
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_up(self, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gunicorn exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if self.request("/health", timeout=2)[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"gunicorn did not answer in {timeout}s:\n{self.log()}")

    def children(self):
        """(worker pids, writer pids) among the master's live children."""
        workers, writers = set(), set()
        for c in self.master.children():
            try:
                cmd = " ".join(c.cmdline())
                if c.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            (writers if "shmkeyspace writer" in cmd else workers).add(c.pid)
        return workers, writers

    def wait_children(self, n_workers, timeout=60, exclude=(), n_writers=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers, writers = self.children()
            if len(workers) == n_workers and not workers & set(exclude) and len(writers) == n_writers:
                return workers, next(iter(writers), None)
            time.sleep(0.1)
        raise AssertionError(
            f"expected {n_workers} workers and {n_writers} writer, have {self.children()}:\n{self.log()}"
        )

    def poll_all(self, path, pids, accept, timeout=60):
        """Request ``path`` concurrently until every pid in ``pids`` has answered with ``accept(status, body)``."""
        todo = set(pids)
        bad = []
        deadline = time.monotonic() + timeout

        def one(_):
            try:
                return self.request(path)
            except (OSError, ValueError) as exc:
                return None, {"error": repr(exc)}

        with ThreadPoolExecutor(8) as ex:
            while todo:
                assert time.monotonic() < deadline, (
                    f"workers {sorted(todo)} never answered {path} as expected; last bad answers {bad[-3:]}"
                )
                for status, body in ex.map(one, range(16)):
                    if status is None:
                        continue
                    if accept(status, body):
                        todo.discard(body["pid"])
                    else:
                        bad.append((status, body))
        return True

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        return self.proc.returncode


def procs_mentioning(text):
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def watch_metrics(etcd):
    """etcd's own count of watchers and watch streams (gauges)."""
    with urllib.request.urlopen(etcd.metrics_url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for name in ("etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m, f"etcd does not export {name}"
        out[name] = int(float(m.group(1)))
    return out


def wait_metrics(etcd, expect, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        m = watch_metrics(etcd)
        if all(v == expect for v in m.values()):
            return m
        assert time.monotonic() < deadline, f"expected {expect} watch(es), etcd says {m}"
        time.sleep(0.2)


def fleet_env(python_env, etcd, prefix, name, **extra):
    env = {k: v for k, v in python_env.items() if not k.startswith(("SHMKEYSPACE_", "GUNICORN_"))}
    env.update(
        SHMKEYSPACE_NAME=name,
        SHMKEYSPACE_PREFIX=prefix,
        SHMKEYSPACE_ENDPOINTS=etcd.endpoint,
        SHMKEYSPACE_DECODER="json",
        **extra,
    )
    return env


def value_is(v, rev=0):
    return lambda status, body: status == 200 and body.get("value") == {"v": v} and body["revision"] >= rev


def test_fleet_one_watch_worker_and_writer_crashes(own_etcd, prefix, shm_name, python_env, tmp_path):
    client = connect(own_etcd.endpoint)
    key = f"{prefix}/cfg"
    gu = None
    try:
        client.put(key, json.dumps({"v": 0}))
        for i in range(50):
            client.put(f"{prefix}/svc/{i:03d}", json.dumps({"i": i}))
        baseline = wait_metrics(own_etcd, 0)  # a private etcd, and our client holds no watch

        gu = Gunicorn(fleet_env(python_env, own_etcd, prefix, shm_name), tmp_path)
        gu.wait_up()
        workers, writer = gu.wait_children(WORKERS)

        # Every worker answers from the snapshot (and only they answer).
        gu.poll_all(f"/get?key={key}", workers, value_is(0))
        status, body = gu.request(f"/prefixed?prefix={prefix}/svc/&limit=5")
        assert status == 200 and body["count"] == 50 and len(body["entries"]) == 5
        status, body = gu.request("/health")
        assert body["writer_alive"] and body["writer_pid"] == writer and body["keys"] == 51
        assert gu.request(f"/get?key={prefix}/missing")[0] == 404

        # ONE watch for the whole fleet (the writer's), whatever the worker count.
        m = wait_metrics(own_etcd, 1)
        assert m == {k: v + 1 for k, v in baseline.items()}

        # A put reaches every worker.
        rev = client.put(key, json.dumps({"v": 1})).header.revision
        gu.poll_all(f"/get?key={key}", workers, value_is(1, rev))

        # SIGKILL a worker: gunicorn replaces it and the new one answers correctly.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        workers2, writer2 = gu.wait_children(WORKERS, exclude=[victim])
        assert writer2 == writer, "a worker crash must not touch the writer"
        new = workers2 - workers
        assert len(new) == 1
        gu.poll_all(f"/get?key={key}", workers2, value_is(1, rev))
        rev = client.put(key, json.dumps({"v": 2})).header.revision
        gu.poll_all(f"/get?key={key}", workers2, value_is(2, rev))
        assert watch_metrics(own_etcd) == {k: v + 1 for k, v in baseline.items()}

        # SIGKILL the writer: the workers keep serving the last snapshot; the master's
        # monitor starts a new writer; new puts reach the same workers again.
        os.kill(writer, signal.SIGKILL)
        for _ in range(20):
            status, body = gu.request(f"/get?key={key}")
            assert status == 200 and body["value"] == {"v": 2}
        deadline = time.monotonic() + 60
        while True:
            status, body = gu.request("/health")
            if status == 200 and body["writer_alive"] and body["writer_pid"] not in (writer, 0):
                break
            assert time.monotonic() < deadline, f"writer was not restarted:\n{gu.log()}"
            time.sleep(0.1)
        new_writer = body["writer_pid"]
        workers3, writer3 = gu.wait_children(WORKERS)
        assert writer3 == new_writer, "the new writer is the master's child"
        assert workers3 == workers2, "workers must not be restarted when the writer is"
        rev = client.put(key, json.dumps({"v": 3})).header.revision
        gu.poll_all(f"/get?key={key}", workers3, value_is(3, rev))
        wait_metrics(own_etcd, 1)  # the dead writer's watch is gone, the new one counted once
        assert "restarting in" in gu.log()

        # SIGTERM the master: it stops its writer too.
        assert gu.stop() == 0, gu.log()
        assert (
            not psutil.pid_exists(new_writer) or psutil.Process(new_writer).status() == psutil.STATUS_ZOMBIE
        )
        assert "stopped writer" in gu.log()
        with Reader(shm_name) as r:  # segments stay: the last snapshot remains readable
            assert r.get(key).decoded == {"v": 3} and not r.health().writer_alive
    finally:
        if gu is not None:
            gu.stop()
        client.close()


def _drop_target():
    """(user, group) for workers that drop privileges: a real second uid, or a skip reason."""
    import grp
    import pwd

    if os.geteuid() != 0:
        return None, "needs root: gunicorn only drops privileges when its master runs as root"
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None, "no 'nobody' user on this host"
    for group in ("nogroup", "nobody"):
        try:
            return (user.pw_name, grp.getgrnam(group).gr_name), ""
        except KeyError:
            continue
    return None, "no 'nogroup'/'nobody' group on this host"


def test_workers_that_drop_privileges_survive_generation_changes(
    etcd_server, client, prefix, shm_name, python_env, tmp_path
):
    """gunicorn as root with user/group set: the root writer's segments stay readable by the workers.

    Workers attach in post_fork while still root and then drop to nobody:nogroup;
    every new generation the writer creates after that must be readable by them.
    """
    target, why = _drop_target()
    if target is None:
        pytest.skip(why)
    user, group = target
    key = f"{prefix}/cfg"
    client.put(key, json.dumps({"v": 0}))
    # The workers run as nobody, who cannot read this interpreter's install (e.g. under
    # /root): --preload imports the app and everything it needs in the root master.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    os.chmod(cwd, 0o755)
    gu = Gunicorn(
        fleet_env(python_env, etcd_server, prefix, shm_name),
        tmp_path,
        workers=3,
        extra_args=["--user", user, "--group", group, "--preload"],
        cwd=cwd,
    )
    try:
        gu.wait_up()
        workers, writer = gu.wait_children(3)
        import pwd

        nobody = pwd.getpwnam(user).pw_uid
        # A worker drops privileges in its own start-up, after the fork that makes it
        # a child: only one that has answered a request is sure to be past it (a loaded
        # CI run caught a worker still at uid 0 between the two).
        gu.poll_all(f"/get?key={key}", workers, value_is(0))
        assert {psutil.Process(p).uids().effective for p in workers} == {nobody}
        assert psutil.Process(writer).uids().effective == 0
        first_gen = _data_gen(shm_name)
        blob = "x" * (256 << 10)
        n = 0
        with Reader(shm_name) as r:
            for change in range(1, 4):
                # Grow the image past the current buffer: the writer moves to a new generation.
                gen = _data_gen(shm_name)
                while _data_gen(shm_name) == gen:
                    rev = client.put(f"{prefix}/big/{n:05d}", json.dumps({"pad": blob})).header.revision
                    n += 1
                    assert r.wait_for_revision(rev, 60), f"writer never published revision {rev}"
                rev = client.put(key, json.dumps({"v": change})).header.revision
                gu.poll_all(f"/get?key={key}", workers, value_is(change, rev))
        assert _data_gen(shm_name) >= first_gen + 3
        for fn in shm_files(shm_name):
            st = os.stat("/dev/shm/" + fn)
            assert st.st_uid == 0 and st.st_mode & 0o777 == 0o640, (fn, oct(st.st_mode))
        workers2, writer2 = gu.wait_children(3)
        assert (workers2, writer2) == (workers, writer), "no worker may have died on the way"
        assert "PermissionError" not in gu.log() and "Traceback" not in gu.log(), gu.log()
        assert gu.stop() == 0, gu.log()
    finally:
        gu.stop()


def _data_gen(name):
    """The newest data generation of snapshot ``name`` in /dev/shm (0 if none)."""
    return max(gen for _shm, gen in segment.segment_files(name))


def test_external_writer(etcd_server, client, prefix, shm_name, python_env, tmp_path):
    key = f"{prefix}/k"
    rev = client.put(key, json.dumps({"v": 7})).header.revision
    w = Writer(shm_name, prefix, client=client, decoder=lambda kv: json.loads(kv.value)).start()
    gu = None
    try:
        gu = Gunicorn(
            fleet_env(python_env, etcd_server, prefix, shm_name, SHMKEYSPACE_EXTERNAL_WRITER="1"),
            tmp_path,
            workers=2,
            extra_args=("--threads", "4"),  # gthread workers: one Reader shared by 4 threads
        )
        gu.wait_up()
        workers, writer = gu.wait_children(2, n_writers=0)  # with an external writer the master starts none
        time.sleep(0.5)
        assert gu.children() == (workers, set())
        gu.poll_all(f"/get?key={key}", workers, value_is(7, rev))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent requests into those threads
            answers = list(pool.map(lambda _: gu.request(f"/get?key={key}"), range(64)))
        assert all(value_is(7, rev)(*a) for a in answers), answers
        status, body = gu.request("/health")
        assert body["writer_pid"] == os.getpid()  # this test process is the writer
        rev = client.put(key, json.dumps({"v": 8})).header.revision
        gu.poll_all(f"/get?key={key}", workers, value_is(8, rev))
        assert gu.stop() == 0
    finally:
        if gu is not None:
            gu.stop()
        w.stop()


def test_stands_by_for_a_running_writer_then_takes_over(
    etcd_server, client, prefix, shm_name, python_env, tmp_path
):
    key = f"{prefix}/k"
    client.put(key, json.dumps({"v": 1}))
    w = Writer(shm_name, prefix, client=client, decoder=lambda kv: json.loads(kv.value)).start()
    gu = None
    try:
        gu = Gunicorn(fleet_env(python_env, etcd_server, prefix, shm_name), tmp_path, workers=2)
        gu.wait_up()
        workers, _ = gu.wait_children(2, n_writers=0)
        assert "standing by" in gu.log()
        w.stop()  # the other writer goes away: the master starts its own
        workers2, writer = gu.wait_children(2, n_writers=1)
        assert workers2 == workers
        deadline = time.monotonic() + 60
        while True:
            status, body = gu.request("/health")
            if body.get("writer_pid") == writer and body.get("writer_alive"):
                break
            assert time.monotonic() < deadline, gu.log()
            time.sleep(0.1)
        rev = client.put(key, json.dumps({"v": 2})).header.revision
        gu.poll_all(f"/get?key={key}", workers, value_is(2, rev))
        assert gu.stop() == 0
    finally:
        if gu is not None:
            gu.stop()
        w.stop()


def test_unreachable_etcd_fails_at_start(prefix, shm_name, python_env, tmp_path):
    class Nowhere:
        endpoint = f"127.0.0.1:{free_port()}"

    gu = Gunicorn(fleet_env(python_env, Nowhere, prefix, shm_name), tmp_path, workers=2)
    try:
        rc = gu.proc.wait(60)
        assert rc != 0
        log = gu.log()
        assert "cannot reach etcd" in log and "exited" in log and "before publishing" in log
        assert "Traceback" not in log
        assert not procs_mentioning(shm_name), "no writer may outlive the failed start"
    finally:
        gu.stop()


def test_reader_helper_without_hooks(client, prefix, shm_name, monkeypatch):
    import shmkeyspace.gunicorn as g
    from shmkeyspace.errors import InvalidSettingError, SegmentNotFoundError

    monkeypatch.setattr(g, "_overrides", {})
    monkeypatch.setattr(g, "_reader", None)
    monkeypatch.setenv("SHMKEYSPACE_NAME", shm_name)
    with pytest.raises(SegmentNotFoundError):
        g.reader()
    rev = client.put(f"{prefix}/k", b"v").header.revision
    with Writer(shm_name, prefix, client=client).start():
        r = g.reader()
        assert r.wait_for_revision(rev, 10) and r.get(f"{prefix}/k").decoded == b"v"
        assert g.reader() is r  # one Reader per process
        g.worker_exit(None, None)
        assert g.reader() is not r
        g.worker_exit(None, None)
    with pytest.raises(InvalidSettingError, match="nmae"):
        g.configure(nmae="typo")
    s = g.configure(name="x", prefix="/p", apply_delay_ms=5)
    assert (s.name, s.prefix, s.apply_delay_ms) == ("x", "/p", 5)
    assert g.WriterSupervisor(s).command()[-2:] == ["--apply-delay", "5"]
    # Workers that drop to another user/group: the writer makes its segments group-readable.
    monkeypatch.delenv("SHMKEYSPACE_GROUP", raising=False)
    monkeypatch.delenv("SHMKEYSPACE_MODE", raising=False)
    assert g.WriterSupervisor(s, group=65534).command()[-2:] == ["--group", "65534"]
    s2 = g.configure(writer_args=["--group", "www-data"])
    assert g.WriterSupervisor(s2, group=65534).command()[-2:] == ["--group", "www-data"]

    class Cfg:  # gunicorn's Config exposes the workers' ids as .uid/.gid
        uid, gid = os.geteuid(), os.getegid()

    assert g.worker_group(Cfg) is None
    Cfg.uid, Cfg.gid = 65534, 65534
    assert g.worker_group(Cfg) == 65534


def test_workers_boot_from_the_state_file_with_etcd_down(client, prefix, shm_name, python_env, tmp_path):
    # Fail static: a state file left by an earlier writer, then a "reboot" (no
    # segments) while etcd is unreachable: workers must still boot and answer.
    from shmkeyspace import state
    from shmkeyspace.decoders import resolve

    d = str(tmp_path / "state")
    key = f"{prefix}/a"
    rev = client.put(key, json.dumps({"v": 7})).header.revision
    w = Writer(
        shm_name, prefix, client=client, decoder=resolve("json"), decoder_name="json", state_dir=d
    ).start()
    w.stop()  # persists on a clean exit
    assert state.read(d, shm_name, prefix, "json").revision == rev
    writerlock.unlink_all(shm_name)

    class Nowhere:
        endpoint = f"127.0.0.1:{free_port()}"

    gu = Gunicorn(
        fleet_env(python_env, Nowhere, prefix, shm_name, SHMKEYSPACE_STATE_DIR=d), tmp_path, workers=2
    )
    try:
        gu.wait_up()
        workers, _ = gu.wait_children(2)
        gu.poll_all(f"/get?key={key}", workers, value_is(7, rev))
        assert "published from the writer's state file" in gu.log()
        assert wait_until(lambda: "etcd not reachable" in gu.log(), 60), gu.log()
        with Reader(shm_name) as r:
            assert r.health().source == "disk" and r.health().writer_alive
    finally:
        gu.stop()


def test_workers_follow_a_writer_restarted_on_new_segments(
    etcd_server, prefix, shm_name, python_env, tmp_path
):
    """Issue 25: with SHMKEYSPACE_UNLINK_ON_EXIT=1, SIGTERM to the writer removes its
    segments and the master restarts it on new ones. The workers (never restarted)
    follow: a new put becomes visible in every worker and /health reports the new
    writer alive, instead of "stale" forever on the removed block."""
    client = connect(etcd_server.endpoint)
    key = f"{prefix}/cfg"
    gu = None
    try:
        client.put(key, json.dumps({"v": 0}))
        env = fleet_env(python_env, etcd_server, prefix, shm_name, SHMKEYSPACE_UNLINK_ON_EXIT="1")
        gu = Gunicorn(env, tmp_path)
        gu.wait_up()
        workers, writer = gu.wait_children(WORKERS)
        gu.poll_all(f"/get?key={key}", workers, value_is(0))
        ino = os.stat(segment.shm_path(segment.ctrl_name(shm_name))).st_ino
        os.kill(writer, signal.SIGTERM)  # exits 0, unlinking its segments; the master restarts it
        assert wait_until(
            lambda: (
                os.path.exists(segment.shm_path(segment.ctrl_name(shm_name)))
                and os.stat(segment.shm_path(segment.ctrl_name(shm_name))).st_ino != ino
            ),
            60,
        ), gu.log()
        workers2, writer2 = gu.wait_children(WORKERS, exclude=[writer])
        assert workers2 == workers, "workers must not be restarted when the writer is"
        rev = client.put(key, json.dumps({"v": 1})).header.revision
        gu.poll_all(f"/get?key={key}", workers, value_is(1, rev))
        gu.poll_all(
            "/health",
            workers,
            lambda status, body: status == 200 and body["writer_alive"] and body["writer_pid"] == writer2,
        )
    finally:
        if gu is not None:
            gu.stop()
        client.close()
