"""The ``shmkeyspace`` command line, run as real subprocesses against a real etcd.

Proves: the writer command mirrors a prefix that get/range/prefixed/stat then
read (table and --json, bytes as base64), follows live puts, stops cleanly on
SIGTERM/SIGINT with exit 0 leaving the segments (or removing them with
--unlink-on-exit), and that every user error is ONE line on stderr with a
non-zero exit.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time

import pytest
from conftest import PYTHON
from helpers_procs import shm_files

from shmkeyspace import writerlock
from shmkeyspace.children import writer_command
from shmkeyspace.cli import main, summarize
from shmkeyspace.embedded import free_port


def cli(args, env, timeout=60):
    return subprocess.run(
        [PYTHON, "-m", "shmkeyspace", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(res):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {res.stderr!r}"
    assert lines[0].startswith("shmkeyspace"), lines[0]
    assert "error:" in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    return lines[0]


class WriterProc:
    """`shmkeyspace writer` as a subprocess; stderr goes to a file (no pipe to fill up)."""

    def __init__(self, env, tmp_path, endpoint, prefix, name, *extra):
        self.log_path = tmp_path / f"writer-{name}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                *writer_command(endpoint, prefix, name, python=PYTHON),
                *extra,
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.name = name

    def wait_published(self, revision=1, timeout=60):
        from shmkeyspace import Reader

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"writer exited early: {self.output()}"
            try:
                with Reader(self.name) as r:
                    if r.revision >= revision and r.health().writer_pid == self.proc.pid:
                        return
            except Exception:
                pass
            time.sleep(0.05)
        raise AssertionError(f"writer published nothing in {timeout}s: {self.output()}")

    def output(self):
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"writer ignored {sig!r}: {self.output()}")
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def writers():
    started = []
    yield started
    for w in started:
        try:
            w.stop(signal.SIGKILL)
        except Exception:
            pass


def start_writer(writers, python_env, tmp_path, etcd_server, prefix, name, *extra, revision=1):
    w = WriterProc(python_env, tmp_path, etcd_server.endpoint, prefix, name, *extra)
    writers.append(w)
    w.wait_published(revision)
    return w


def test_read_commands_tables_and_json(etcd_server, client, prefix, shm_name, python_env, tmp_path, writers):
    values = {
        f"{prefix}/a": b"hello",
        f"{prefix}/b": b"\xff\x00binary",
        f"{prefix}/c": b'{"x": 1}',
        f"{prefix}/d": b"x" * 500,
    }
    rev = 0
    for k, v in values.items():
        rev = client.put(k, v).header.revision
    w = start_writer(writers, python_env, tmp_path, etcd_server, prefix, shm_name, revision=rev)

    # get: table and JSON; raw bytes come back as base64, losslessly
    res = cli(["get", shm_name, f"{prefix}/a"], python_env)
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.splitlines()
    assert header.split() == ["KEY", "MOD_REV", "VER", "VALUE"]
    assert row.split()[0] == f"{prefix}/a" and row.split()[-1] == "hello"
    for k, v in values.items():
        res = cli(["get", shm_name, k, "--json"], python_env)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["key"] == k
        assert base64.b64decode(out["value"]["base64"]) == v
        assert out["version"] == 1 and out["mod_revision"] <= rev and out["lease"] == 0

    # a long value is truncated in the table, whole in JSON
    res = cli(["get", shm_name, f"{prefix}/d"], python_env)
    assert "…" in res.stdout and "x" * 500 not in res.stdout

    # range [FROM, TO) and '' as "to the end"
    res = cli(["range", shm_name, f"{prefix}/b", f"{prefix}/d", "--json"], python_env)
    assert res.returncode == 0, res.stderr
    assert [e["key"] for e in json.loads(res.stdout)] == [f"{prefix}/b", f"{prefix}/c"]
    res = cli(["range", shm_name, f"{prefix}/c", ""], python_env)
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:]] == [f"{prefix}/c", f"{prefix}/d"]

    # prefixed, with and without --limit
    res = cli(["prefixed", shm_name, f"{prefix}/"], python_env)
    assert res.returncode == 0, res.stderr
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:]] == sorted(values)
    assert "(4 entries)" in res.stderr
    res = cli(["prefixed", shm_name, f"{prefix}/", "--json", "--limit", "2"], python_env)
    assert [e["key"] for e in json.loads(res.stdout)] == sorted(values)[:2]
    res = cli(["prefixed", shm_name, f"{prefix}/zzz", "--json"], python_env)
    assert res.returncode == 0 and json.loads(res.stdout) == []

    # a missing key: a message and exit 1
    res = cli(["get", shm_name, f"{prefix}/nope"], python_env)
    assert res.returncode == 1
    assert "not found" in one_error_line(res) and res.stdout == ""

    # live update, seen through the CLI
    rev2 = client.put(f"{prefix}/a", b"world").header.revision
    deadline = time.monotonic() + 30
    while True:
        out = json.loads(cli(["get", shm_name, f"{prefix}/a", "--json"], python_env).stdout)
        if out["mod_revision"] == rev2:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.1)
    assert base64.b64decode(out["value"]["base64"]) == b"world" and out["version"] == 2

    # list shows it, with a running writer
    res = cli(["list", "--json"], python_env)
    mine = [r for r in json.loads(res.stdout) if r["name"] == shm_name]
    assert mine and mine[0]["writer_running"] and mine[0]["keys"] == 4 and mine[0]["writer_pid"] == w.proc.pid


def test_json_decoder_and_stat(etcd_server, client, prefix, shm_name, python_env, tmp_path, writers):
    client.put(f"{prefix}/svc/1", json.dumps({"host": "10.0.0.1", "port": 80, "tags": ["a"]}))
    rev = client.put(
        f"{prefix}/svc/2", json.dumps({"host": "10.0.0.2", "port": 81, "tags": []})
    ).header.revision
    client.put(f"{prefix}/svc/bad", b"not json")  # logged by the writer and left out
    rev = client.get_response(b"\0").header.revision
    w = start_writer(
        writers, python_env, tmp_path, etcd_server, prefix, shm_name, "--decoder", "json", revision=rev
    )
    res = cli(["prefixed", shm_name, f"{prefix}/svc/", "--json"], python_env)
    assert res.returncode == 0, res.stderr
    assert [e["value"] for e in json.loads(res.stdout)] == [
        {"host": "10.0.0.1", "port": 80, "tags": ["a"]},
        {"host": "10.0.0.2", "port": 81, "tags": []},
    ]
    assert "decode of key" in w.output() and "/svc/bad" in w.output()

    res = cli(["stat", shm_name, "--json"], python_env)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["name"] == shm_name and st["keys"] == 2 and st["revision"] == rev
    assert st["writer_alive"] is True and st["writer_pid"] == w.proc.pid
    assert st["bytes"] > 0 and st["generation"] >= 1 and st["heartbeat_age"] < 30
    assert "etcd_current_revision" not in st

    # A write outside the prefix moves etcd but not the published revision.
    other = client.put(f"/elsewhere{prefix}", b"1").header.revision
    res = cli(["stat", shm_name, "--json", "--endpoints", etcd_server.endpoint], python_env)
    st = json.loads(res.stdout)
    assert st["revision"] == rev
    assert st["etcd_current_revision"] >= other
    assert st["lag_behind_etcd"] == st["etcd_current_revision"] - rev > 0

    res = cli(["stat", shm_name, "--endpoints", etcd_server.endpoint], python_env)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert f"alive (pid {w.proc.pid}" in text and "etcd now" in text and "lag behind etcd" in text
    assert any(ln.split()[:2] == ["keys", "2"] for ln in text.splitlines())


def test_sigterm_exits_0_and_keeps_segments(
    etcd_server, client, prefix, shm_name, python_env, tmp_path, writers
):
    rev = client.put(f"{prefix}/k", b"v1").header.revision
    w = start_writer(writers, python_env, tmp_path, etcd_server, prefix, shm_name, revision=rev)

    res = cli(["unlink", shm_name], python_env)  # refused while the writer runs
    assert res.returncode == 1 and "running writer" in one_error_line(res)
    assert shm_files(shm_name)

    assert w.stop(signal.SIGTERM) == 0, w.output()
    assert "stopped; segments kept" in w.output()
    assert "Traceback" not in w.output()
    assert shm_files(shm_name), "segments must outlive the writer"

    st = json.loads(cli(["stat", shm_name, "--json"], python_env).stdout)
    assert st["writer_alive"] is False and st["revision"] == rev
    assert "NOT RUNNING" in cli(["stat", shm_name], python_env).stdout
    res = cli(["get", shm_name, f"{prefix}/k", "--json"], python_env)  # the last snapshot still answers
    assert res.returncode == 0 and base64.b64decode(json.loads(res.stdout)["value"]["base64"]) == b"v1"

    res = cli(["unlink", shm_name], python_env)
    assert res.returncode == 0 and "removed" in res.stdout
    assert shm_files(shm_name) == []
    res = cli(["unlink", shm_name], python_env)
    assert res.returncode == 1 and "no shared memory segments" in one_error_line(res)
    res = cli(["stat", shm_name], python_env)
    assert res.returncode == 1 and "no shared memory segment" in one_error_line(res)


def test_sigint_with_unlink_on_exit(etcd_server, client, prefix, shm_name, python_env, tmp_path, writers):
    rev = client.put(f"{prefix}/k", b"v").header.revision
    w = start_writer(
        writers, python_env, tmp_path, etcd_server, prefix, shm_name, "--unlink-on-exit", revision=rev
    )
    assert shm_files(shm_name)
    assert w.stop(signal.SIGINT) == 0, w.output()
    assert shm_files(shm_name) == []


def test_exit_with_parent(etcd_server, client, prefix, shm_name, python_env, tmp_path):
    """--exit-with-parent (used by the gunicorn master): a SIGKILLed parent leaves no orphan writer."""
    rev = client.put(f"{prefix}/k", b"v").header.revision
    code = (
        "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); "
        "time.sleep(300)"
    )
    parent = subprocess.Popen(
        [
            PYTHON,
            "-c",
            code,
            *writer_command(etcd_server.endpoint, prefix, shm_name, python=PYTHON),
            "--exit-with-parent",
            "--log-level",
            "warning",
        ],
        env=python_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        writer_pid = int(parent.stdout.readline())
        from shmkeyspace import Reader

        with Reader(shm_name, wait=60) as r:
            assert r.wait_for_revision(rev, 30)
            deadline = time.monotonic() + 30
            while r.health().writer_pid != writer_pid:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            parent.kill()
            parent.wait(10)
            deadline = time.monotonic() + 30
            while writerlock.writer_is_running(shm_name) or _alive(writer_pid):
                assert time.monotonic() < deadline, "the writer outlived its parent"
                time.sleep(0.05)
            h = r.health()
            assert not h.writer_alive and h.writer_pid == 0  # pid 0: it stopped cleanly (SIGTERM)
            assert r.get(f"{prefix}/k").decoded == b"v"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def test_module_function_decoder_and_env_settings(
    etcd_server, client, prefix, shm_name, python_env, tmp_path, writers
):
    (tmp_path / "my_decoders.py").write_text("def upper(kv):\n    return kv.value.decode().upper()\n")
    env = dict(
        python_env,
        PYTHONPATH=f"{tmp_path}{os.pathsep}{python_env['PYTHONPATH']}",
        SHMKEYSPACE_DECODER="my_decoders:upper",
    )
    rev = client.put(f"{prefix}/k", b"shout").header.revision
    w = WriterProc(env, tmp_path, etcd_server.endpoint, prefix, shm_name)
    writers.append(w)
    w.wait_published(rev)
    out = json.loads(cli(["get", shm_name, f"{prefix}/k", "--json"], python_env).stdout)
    assert out["value"] == "SHOUT"


def test_second_writer_is_refused(etcd_server, client, prefix, shm_name, python_env, tmp_path, writers):
    rev = client.put(f"{prefix}/k", b"v").header.revision
    w = start_writer(writers, python_env, tmp_path, etcd_server, prefix, shm_name, revision=rev)
    res = cli(
        ["writer", "--endpoints", etcd_server.endpoint, "--prefix", prefix, "--name", shm_name], python_env
    )
    assert res.returncode == 1
    line = one_error_line(res)
    assert "already has a live writer" in line and str(w.proc.pid) in line
    assert w.proc.poll() is None  # the first one is untouched
    st = json.loads(cli(["stat", shm_name, "--json"], python_env).stdout)
    assert st["writer_alive"] and st["writer_pid"] == w.proc.pid


@pytest.mark.parametrize(
    "case",
    [
        "bad-argument",
        "missing-required",
        "unreachable-etcd",
        "missing-segment",
        "bad-decoder",
        "invalid-name-writer",
        "invalid-name-get",
        "unclean-prefix",
        "writable-mode",
        "bad-endpoint",
        "unknown-command",
    ],
)
def test_errors_are_one_line(case, shm_name, python_env):
    free = free_port()
    args, code, expect = {
        "bad-argument": (
            ["writer", "--prefix", "/p", "--name", shm_name, "--apply-delay", "soon"],
            2,
            "--apply-delay",
        ),
        "missing-required": (["writer", "--name", shm_name], 2, "--prefix"),
        "unreachable-etcd": (
            ["writer", "--endpoints", f"127.0.0.1:{free}", "--prefix", "/p", "--name", shm_name],
            1,
            f"cannot reach etcd at 127.0.0.1:{free}",
        ),
        "missing-segment": (["get", shm_name, "/k"], 1, "no shared memory segment"),
        "bad-decoder": (
            ["writer", "--prefix", "/p", "--name", shm_name, "--decoder", "no_such_module_x:fn"],
            1,
            "cannot import module 'no_such_module_x'",
        ),
        "invalid-name-writer": (
            ["writer", "--prefix", "/p", "--name", "../etc/passwd"],
            1,
            "invalid snapshot name",
        ),
        "invalid-name-get": (["get", "a/b", "/k"], 1, "invalid snapshot name"),
        "unclean-prefix": (
            ["writer", "--prefix", "/p//", "--name", shm_name, "--endpoints", f"127.0.0.1:{free}"],
            1,
            "prefix '/p//' is not clean: '/p' mirrors every key starting with /p (also /p-old/...), "
            "'/p/' mirrors only keys under /p/",
        ),
        "writable-mode": (
            ["writer", "--prefix", "/p", "--name", shm_name, "--mode", "0660"],
            2,
            "0660 lets users other than the writer's write the snapshot, and readers refuse such segments",
        ),
        "bad-endpoint": (
            ["writer", "--prefix", "/p", "--name", shm_name, "--endpoints", "nohost"],
            1,
            "bad etcd endpoint",
        ),
        "unknown-command": (["frobnicate"], 2, "invalid choice"),
    }[case]
    env = {k: v for k, v in python_env.items() if not k.startswith("SHMKEYSPACE_")}
    res = cli(args, env)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert expect in one_error_line(res)
    assert res.stdout == ""
    assert shm_files(shm_name) == [], "a writer that failed to start must leave nothing behind"


def test_main_in_process(capsys):
    assert main(["--version"]) == 0
    assert main(["get"]) == 2
    assert "required" in capsys.readouterr().err
    assert summarize(b"\xff" * 10).startswith("b'")
    assert summarize("x" * 100, width=10) == "x" * 9 + "…"
    assert summarize({"a": [1, b"z"]}) == '{"a":[1,{"base64":"eg=="}]}'
