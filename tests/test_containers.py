"""Containers: one writer and its readers in separate mount+IPC+PID namespaces.

What a Kubernetes node with the writer DaemonSet does (workers/kubernetes/,
docs/containers.md), built from ``unshare``: each "container" has its own mount,
IPC and PID namespace (the process in it is pid 1, with its own /proc) and
bind-mounts one shared host directory at /dev/shm. The integration test needs
root and namespaces; it is skipped with the reason otherwise. The tests of
:mod:`shmkeyspace.procns` in this process's own namespace and the structural
checks of the manifests run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from typing import Dict, List, Optional

import helpers_procs as hp
import pytest

from shmkeyspace import procns, segment
from shmkeyspace.children import writer_command

WORKERS = os.path.join(hp.ROOT, "workers")
PKG = os.path.join(hp.ROOT, "shmkeyspace")
WAIT = 90.0  # generous: a busy 2-core machine, Python start-ups inside namespaces

#: A container: new mount, IPC and PID namespaces, /proc of its own, and the
#: shared directory ($0) bind-mounted at /dev/shm (read-only with ro=1); the
#: process in it dies with the unshare process (--kill-child).
CONTAINER = ["unshare", "--mount", "--ipc", "--pid", "--fork", "--mount-proc", "--kill-child"]
MOUNT_SHM = (
    'mount --bind "$0" /dev/shm && { [ "$RO" != 1 ] || mount -o remount,bind,ro /dev/shm; } && exec "$@"'
)

#: A reader in a container: reports what it sees every few ms. argv: NAME PREFIX PROGRESS.
READER = r"""
import os, sys, time
import helpers_procs as hp
from shmkeyspace import Reader, segment
name, prefix, progress = sys.argv[1:4]
p = hp.ProgressFile(progress)
r = Reader(name, wait=120)
n = top = back = 0
while True:
    h = r.health()
    top = max(top, h.revision)
    back = max(back, top - h.revision)  # how far the revision ever went back (issue 25: never)
    e = r.get(prefix + "/k")
    big = r.prefixed(prefix + "/big")
    n += 1
    p.update(pid=os.getpid(), pidns=segment.pid_namespace(), reads=n, revision=h.revision,
             value=e.decoded if e else None, big=sum(len(b.decoded) for b in big),
             generation=h.generation, alive=h.writer_alive, writer_pid=h.writer_pid,
             writer_pidns=h.writer_pidns, source=h.source, back=back)
    time.sleep(0.02)
"""


# -- procns in this process's namespace (no root needed) ------------------------------------------


def test_locate_in_the_same_namespace():
    ours = segment.pid_namespace()
    if not ours:
        pytest.skip("/proc/self/ns/pid cannot be read here")
    assert procns.locate(os.getpid(), ours) == procns.WriterPid(os.getpid(), "same")
    assert procns.locate(0, ours) == procns.WriterPid(None, "same")  # a writer that stopped cleanly
    assert procns.locate(4242, 0) == procns.WriterPid(None, "unknown")  # an older writer
    # A namespace no visible process is in: another one, pid not known here.
    assert procns.locate(1, ours + 1) == procns.WriterPid(None, "other")
    assert procns.pid_in_namespace(os.getpid(), ours) == os.getpid()
    assert procns.pid_in_namespace(os.getpid(), ours, max_scan=0) is None
    assert procns.describe(4242, procns.WriterPid(4242, "same")) == "pid 4242"
    assert procns.describe(4242, procns.WriterPid(None, "unknown")) == "pid 4242"
    assert procns.describe(1, procns.WriterPid(4242, "other")) == "pid 4242 in its own PID namespace, 1 there"
    assert procns.describe(1, procns.WriterPid(None, "other")) == "pid 1 in another PID namespace"


# -- the manifests ----------------------------------------------------------------------------------


def _documents(path: str) -> List[dict]:
    try:
        import yaml
    except ImportError:
        yaml = None
    text = open(path).read()
    assert "\t" not in text, f"{path}: a tab (YAML indents with spaces)"
    if yaml is None:
        return []
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _cli_flags(subcommand: str) -> set:
    res = subprocess.run(
        [hp.PYTHON, "-m", "shmkeyspace", subcommand, "--help"],
        env=hp.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return set(re.findall(r"--[a-z][a-z-]*", res.stdout))


def test_manifests_use_one_directory_and_existing_cli():
    """Writer and app mount the same host directory at /dev/shm; the commands they
    run use only flags the CLI has; the uids agree. Parsed with PyYAML when it is
    installed, else checked as text (PyYAML is not a dependency)."""
    paths = [
        os.path.join(WORKERS, "kubernetes", "writer-daemonset.yaml"),
        os.path.join(WORKERS, "kubernetes", "app-deployment.yaml"),
        os.path.join(WORKERS, "docker-compose.yml"),
    ]
    texts = {p: open(p).read() for p in paths}
    for p, text in texts.items():
        _documents(p)  # parses (if PyYAML is here), no tabs
        assert "/run/shmkeyspace/shm" in text, p
        assert re.search(r"(mountPath: /dev/shm|:/dev/shm)", text), p
    writer_flags, stat_flags = _cli_flags("writer"), _cli_flags("stat")
    for p, text in texts.items():
        for m in re.finditer(r"shmkeyspace (writer|stat)\b([^\n\]|]*)", text):
            used = set(re.findall(r"--[a-z][a-z-]*", m.group(2)))
            known = writer_flags if m.group(1) == "writer" else stat_flags
            assert used <= known, (p, m.group(0), used - known)
    # Every SHMKEYSPACE_* setting they name is one the package reads.
    source = "".join(open(os.path.join(PKG, f)).read() for f in os.listdir(PKG) if f.endswith(".py"))
    for p, text in texts.items():
        for var in set(re.findall(r"SHMKEYSPACE_[A-Z_]*[A-Z]", text)):
            assert var in source, (p, var)
    # uids: the writer 10001 with group 10001; the app trusts 10001 and is in its group.
    ds = texts[paths[0]]
    assert "runAsUser: 10001" in ds and '{name: SHMKEYSPACE_GROUP, value: "10001"}' in ds
    app = texts[paths[1]]
    assert "supplementalGroups: [10001]" in app and '{name: SHMKEYSPACE_WRITER_UID, value: "10001"}' in app
    compose = texts[paths[2]]
    assert 'user: "10001:10001"' in compose and 'SHMKEYSPACE_WRITER_UID: "10001"' in compose
    if not _documents(paths[0]):
        return  # no PyYAML: the text checks above are what we can do
    ds_doc = _documents(paths[0])[0]
    app_doc = _documents(paths[1])[0]
    assert ds_doc["kind"] == "DaemonSet" and app_doc["kind"] == "Deployment"
    for doc in (ds_doc, app_doc):
        spec = doc["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert vols[mounts["/dev/shm"]]["hostPath"]["path"] == "/run/shmkeyspace/shm"


# -- writer and readers in separate namespaces (root) ---------------------------------------------


def _shared_dir(tmp_path) -> str:
    """The directory the 'containers' share: on a tmpfs (as /run is on a node), never
    the host's /dev/shm itself; a subdirectory of it when it is a tmpfs."""
    base = "/dev/shm" if _is_tmpfs("/dev/shm") else str(tmp_path)
    return tempfile.mkdtemp(prefix="shmkeyspace-containers-", dir=base)


def _is_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(ln.split()[1] == path and ln.split()[2] == "tmpfs" for ln in f)
    except OSError:
        return False


def _namespaces_usable(shm_dir: str) -> Optional[str]:
    """None if a container (unshare, bind mount at /dev/shm) can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root: unshare --mount --pid and mount --bind"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs unshare(1) and nsenter(1) (util-linux)"
    try:
        res = subprocess.run(
            [*CONTAINER, "sh", "-c", MOUNT_SHM, shm_dir, "sh", "-c", 'echo "$$"'],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if res.returncode != 0 or res.stdout.split()[:1] != ["1"]:
        return f"unshare cannot create mount+IPC+PID namespaces here: {res.stderr.strip()[:300]}"
    return None


def _container(shm_dir: str, argv: List[str], log, read_only: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [*CONTAINER, "sh", "-c", MOUNT_SHM, shm_dir, *argv],
        env=hp.child_env({"RO": "1" if read_only else "0"}),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _inner_pid(proc: subprocess.Popen) -> int:
    """The host pid of the process unshare forked (pid 1 of the container)."""
    path = f"/proc/{proc.pid}/task/{proc.pid}/children"
    found: List[int] = []

    def child():
        try:
            found[:] = [int(x) for x in open(path).read().split()]
        except (OSError, ValueError):
            return False
        return bool(found)

    assert hp.wait_until(child, WAIT), f"unshare {proc.pid} forked nothing (exit {proc.poll()})"
    return found[0]


def _stat(argv_prefix: List[str], name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*argv_prefix, hp.PYTHON, "-m", "shmkeyspace", "stat", name, *extra],
        env=hp.child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def _stat_json(argv_prefix: List[str], name: str) -> dict:
    res = _stat(argv_prefix, name, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


class Fleet:
    """The 'containers' of the test and their logs; :meth:`close` kills every one."""

    def __init__(self, tmp_path, shm_dir: str) -> None:
        self.tmp = tmp_path
        self.shm_dir = shm_dir
        self.procs: List[subprocess.Popen] = []
        self.logs: Dict[str, str] = {}

    def start(self, label: str, argv: List[str], read_only: bool = False) -> subprocess.Popen:
        path = str(self.tmp / f"{label}.log")
        self.logs[label] = path
        with open(path, "wb") as log:
            proc = _container(self.shm_dir, argv, log, read_only)
        self.procs.append(proc)
        return proc

    def output(self) -> str:
        parts = []
        for label, path in self.logs.items():
            try:
                parts.append(f"--- {label}\n{open(path, errors='replace').read()[-3000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def close(self) -> None:
        for proc in self.procs:
            hp.stop(proc, signal.SIGKILL)  # the namespace's pid 1 dies with unshare (--kill-child)


def test_writer_and_readers_in_separate_namespaces(etcd_server, client, prefix, tmp_path):
    shm_dir = _shared_dir(tmp_path)
    fleet = Fleet(tmp_path, shm_dir)
    try:
        why = _namespaces_usable(shm_dir)
        if why:
            pytest.skip(why)
        _run_fleet(fleet, etcd_server, client, prefix, tmp_path, shm_dir)
    finally:
        fleet.close()
        shutil.rmtree(shm_dir, ignore_errors=True)


def _run_fleet(fleet: Fleet, etcd_server, client, prefix, tmp_path, shm_dir):
    name = f"test-ct-{uuid.uuid4().hex[:10]}"
    state_dir = str(tmp_path / "state")  # the DaemonSet's hostPath state dir: same path in every container
    writer_argv = writer_command(
        etcd_server.endpoint,
        prefix,
        name,
        "--decoder",
        "utf8",
        "--apply-delay",
        "5",
        "--heartbeat",
        "0.1",
        "--state-dir",
        state_dir,
        "--persist-interval",
        "0.2",
        python=hp.PYTHON,
    )
    client.put(f"{prefix}/k", "v1")
    writer_a = fleet.start("writer-a", writer_argv)
    progress = [str(tmp_path / "reader-rw.json"), str(tmp_path / "reader-ro.json")]
    readers = [
        fleet.start("reader-rw", [hp.PYTHON, "-c", READER, name, prefix, progress[0]]),
        fleet.start("reader-ro", [hp.PYTHON, "-c", READER, name, prefix, progress[1]], read_only=True),
    ]

    def seen() -> List[dict]:
        return [hp.read_progress(p) for p in progress]

    def all_see(**want) -> bool:
        return all(s and all(s.get(k) == v for k, v in want.items()) for s in seen())

    def wait_all(what: str, **want) -> List[dict]:
        assert hp.wait_until(lambda: all_see(**want), WAIT), f"{what}: {seen()}\n{fleet.output()}"
        return seen()

    # 1. Readers in their own namespaces see the writer's data through the shared directory.
    s = wait_all("first snapshot", value="v1", alive=True)
    host_a = _inner_pid(writer_a)
    ns_a = segment.pid_namespace(host_a)
    assert ns_a and ns_a != segment.pid_namespace()
    for r in s:
        assert r["pid"] == 1 and r["writer_pid"] == 1, r  # each in its own PID namespace
        assert r["writer_pidns"] == ns_a and r["pidns"] not in (ns_a, segment.pid_namespace()), r
    assert segment.ctrl_name(name).lstrip("/") in os.listdir(shm_dir)
    assert not os.path.exists(segment.shm_path(segment.ctrl_name(name)))  # not in the host's /dev/shm

    # 2. stat inside a reader's namespaces: the writer is in another one, its pid unknown here.
    reader_host = _inner_pid(readers[0])
    nsenter = ["nsenter", f"--target={reader_host}", "--mount", "--pid", "--"]
    st = _stat_json(nsenter, name)
    assert st["writer_alive"] and st["writer_pid"] == 1, st
    assert st["writer_pid_namespace"] == "other" and st["writer_pid_here"] is None, st
    res = _stat(nsenter, name)
    assert "alive (pid 1 in another PID namespace" in res.stdout, res.stdout + res.stderr
    # ... and from the host's PID namespace (the writer's is a child of it): the host pid.
    host_view = ["unshare", "--mount", "sh", "-c", MOUNT_SHM, shm_dir]
    st = _stat_json(host_view, name)
    assert st["writer_pid_namespace"] == "other" and st["writer_pid_here"] == host_a, (st, host_a)
    res = _stat(host_view, name)
    assert f"alive (pid {host_a} in its own PID namespace, 1 there" in res.stdout, res.stdout + res.stderr

    # 3. A put in etcd reaches the readers.
    client.put(f"{prefix}/k", "v2")
    s = wait_all("a put", value="v2")
    gen1 = s[0]["generation"]

    # 4. A new generation: the image outgrows its 1 MiB buffer.
    client.put(f"{prefix}/big1", "x" * (700 << 10))
    client.put(f"{prefix}/big2", "y" * (700 << 10))
    s = wait_all("a new generation", big=1400 << 10, value="v2")
    # The reader script reads health (the generation) before the keys, so one line
    # can pair the new keys with the previous generation: wait for the generation too.
    assert hp.wait_until(lambda: all(r["generation"] > gen1 for r in seen()), WAIT), seen()

    # 5. The writer dies (SIGKILL): readers keep the last snapshot and see it dead.
    hp.stop(writer_a, signal.SIGKILL)
    s = wait_all("writer A dead", alive=False, value="v2", big=1400 << 10)
    before = max(r["reads"] for r in s)
    assert hp.wait_until(lambda: all(r["reads"] > before for r in seen()), WAIT)  # and keep reading

    # 6. A new writer in a new namespace takes over in place (from the state file);
    # the readers, never restarted, follow it.
    client.put(f"{prefix}/k", "v3")  # while no writer runs
    writer_b = fleet.start("writer-b", writer_argv)
    host_b = _inner_pid(writer_b)
    ns_b = segment.pid_namespace(host_b)
    assert ns_b not in (0, ns_a)
    s = wait_all("writer B", alive=True, writer_pidns=ns_b, value="v3", big=1400 << 10)
    client.put(f"{prefix}/k", "v4")
    s = wait_all("a put after the restart", value="v4", writer_pidns=ns_b)
    st = _stat_json(host_view, name)
    assert st["writer_pid_here"] == host_b and st["source"] == "etcd", (st, host_b)

    # 7. Another generation under writer B (twice the bytes), followed too.
    gen_b = s[0]["generation"]
    client.put(f"{prefix}/big3", "z" * (1400 << 10))
    client.put(f"{prefix}/big4", "w" * (1400 << 10))
    s = wait_all("a generation under writer B", big=4200 << 10, value="v4")
    assert hp.wait_until(lambda: all(r["generation"] > gen_b for r in seen()), WAIT), seen()

    # 8. SIGTERM to the writer, pid 1 of its namespace, stops it cleanly (exit 0).
    os.kill(host_b, signal.SIGTERM)
    assert writer_b.wait(WAIT) == 0, fleet.output()
    wait_all("writer B stopped", alive=False, writer_pid=0, value="v4")
    for r in readers:
        assert r.poll() is None, fleet.output()  # no reader died on the way
    # Through the SIGKILL and the takeover, no reader saw the revision go back: writer B
    # took over writer A's newer image instead of publishing its older state file.
    assert all(r["back"] == 0 for r in seen()), seen()
