"""Security promises: validated names, private segment modes, permission errors that
say what is wrong, read-only mappings in readers, and the trust rules of trust.py:
a segment another local user created first (a "squat") is refused by the writer
and by readers, as is one writable by anyone but its owner.

Permission checks run a child that drops root for uid/gid 65534 (nobody/nogroup)
after importing, so the child itself is real and unprivileged. Squatters are real
processes of a second uid (``setpriv --reuid=nobody``), as in issue 16.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess

import helpers_procs as hp
import pytest

from shmkeyspace import Reader, Writer, publisher, segment, trust, writerlock
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.errors import InvalidNameError, InvalidSettingError, UntrustedSegmentError
from shmkeyspace.snapshot import pack_entry

BAD_NAMES = [
    "a/b",
    "/abs",
    "..",
    "a..b",
    "../etc/passwd",
    "a\0b",
    "",
    "x" * 201,
    ".hidden",
    "-dash",
    "sp ace",
    "new\nline",
    "é",
    "a*b",
]


def _publish_small(name: str, **kw) -> publisher.Publisher:
    pub = publisher.Publisher(name, **kw)
    b = ImageBuilder()
    b.reset([(b"/s/a", pack_entry(b"/s/a", "secret", 1, 1, 1, 0))], 1)
    parts, total = b.parts()
    pub.publish(parts, total, 1, 1)
    return pub


@pytest.mark.parametrize("bad", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_invalid_names_are_refused_everywhere(bad):
    for make in (
        lambda: Reader(bad),
        lambda: publisher.Publisher(bad),
        lambda: Writer(bad, "/p", endpoints="127.0.0.1:1"),  # refused before any etcd I/O
        lambda: segment.validate_name(bad),
        lambda: writerlock.unlink_all(bad),
        lambda: writerlock.writer_is_running(bad),
    ):
        with pytest.raises(InvalidNameError) as ei:
            make()
        msg = str(ei.value)
        assert "invalid snapshot name" in msg and "[A-Za-z0-9_.-]" in msg, msg
    # Nothing was created for it.
    assert not any(bad and f.startswith("shmks." + bad) for f in os.listdir("/dev/shm") if bad.isprintable())


def test_non_str_names_are_refused():
    for bad in (b"name", None, 7):
        with pytest.raises(InvalidNameError, match="must be str"):
            Reader(bad)
        with pytest.raises(InvalidNameError, match="must be str"):
            publisher.Publisher(bad)


def test_longest_valid_name_works():
    name = "L" * 199 + "z"  # 200 characters: the limit
    pub = _publish_small(name)
    try:
        with Reader(name) as r:
            assert r.get("/s/a").decoded == "secret"
    finally:
        pub.close(unlink=True)
    assert hp.shm_files(name) == []


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_segments_are_private_by_default(shm_name):
    old = os.umask(0)  # a permissive umask must not widen the mode
    try:
        pub = _publish_small(shm_name)
    finally:
        os.umask(old)
    try:
        files = hp.shm_files(shm_name)
        assert len(files) == 2, files  # control + one data generation
        for f in files:
            st = os.stat("/dev/shm/" + f)
            assert _mode("/dev/shm/" + f) == 0o600, (f, oct(st.st_mode))
            assert st.st_uid == os.getuid()
    finally:
        pub.close()


def test_group_readable_segments_with_gid(shm_name):
    gid = grp.getgrnam("nogroup").gr_gid if _has_group("nogroup") else 65534
    pub = _publish_small(shm_name, mode=0o640, gid=gid)
    try:
        # A new generation gets the same mode and group.
        b = ImageBuilder()
        b.reset([(b"/s/big", pack_entry(b"/s/big", b"z" * 1_500_000, 2, 2, 1, 0))], 2)
        parts, total = b.parts()
        pub.publish(parts, total, 2, 1)
        assert pub.gen == 2
        files = hp.shm_files(shm_name)
        assert len(files) == 2, files
        for f in files:
            st = os.stat("/dev/shm/" + f)
            assert _mode("/dev/shm/" + f) == 0o640 and st.st_gid == gid, (f, oct(st.st_mode), st.st_gid)
    finally:
        pub.close()


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


UNPRIVILEGED_READER = r"""
import json, os, sys
from shmkeyspace import Reader
name = sys.argv[1]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.geteuid() == 65534
try:
    with Reader(name) as r:
        print(json.dumps({"ok": r.get("/s/a").decoded}))
except PermissionError as exc:
    print(json.dumps({"error": type(exc).__name__, "errno": exc.errno, "msg": str(exc)}))
"""


def _run_unprivileged(name: str) -> dict:
    proc = hp.spawn(UNPRIVILEGED_READER, name)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        hp.stop(proc)
    assert proc.returncode == 0, err
    return hp.last_json(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_reader_without_permission_gets_clear_error(shm_name):
    pub = _publish_small(shm_name)
    try:
        res = _run_unprivileged(shm_name)
        assert res.get("error") == "SegmentPermissionError", res  # caught as PermissionError
        assert res["errno"] == 13
        assert "no permission to read" in res["msg"] and f"/shmks.{shm_name}" in res["msg"], res
    finally:
        pub.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_reader_in_the_group_can_read_0640(shm_name):
    pub = _publish_small(shm_name, mode=0o640, gid=65534)
    try:
        assert _run_unprivileged(shm_name) == {"ok": "secret"}
    finally:
        pub.close()


def test_reader_mappings_are_read_only(shm_name):
    pub = _publish_small(shm_name)
    try:
        with Reader(shm_name) as r:
            assert r.get("/s/a").decoded == "secret"
            # Python-level writes are refused...
            with pytest.raises(TypeError, match="read-only|readonly"):
                r._data.buf[100] = 1
            with pytest.raises(TypeError, match="read-only|readonly"):
                r._data.mm[100] = 1
            with pytest.raises(TypeError, match="read-only|readonly"):
                r._ctrl.mm[16] = 1
            with pytest.raises(TypeError, match="read-only|readonly"):
                r._ctrl.mm.write(b"x")
            assert r._data.buf.readonly and r._ctrl.words.readonly
            assert r.get("/s/a").decoded == "secret"
    finally:
        pub.close()


RAW_WRITE = r"""
import ctypes, json, sys
from shmkeyspace import Reader
r = Reader(sys.argv[1])
mine = [l.split() for l in open("/proc/self/maps") if "/shmks." + sys.argv[1] in l]
print(json.dumps({"perms": sorted(m[1] for m in mine)}), flush=True)
addr = int([m for m in mine if m[-1].endswith(".1")][0][0].split("-")[0], 16)
print("writing", hex(addr), flush=True)
ctypes.memset(addr + 64, 0x41, 8)   # bypass Python: a raw store into the mapping
print("WROTE", flush=True)
"""


def test_raw_store_into_reader_mapping_faults(shm_name):
    """A reader maps both segments PROT_READ (shared), so even C code in a reader
    cannot write the snapshot: a raw store is a SIGSEGV."""
    pub = _publish_small(shm_name)
    try:
        proc = hp.spawn(RAW_WRITE, shm_name)
        out, err = proc.communicate(timeout=60)
        perms = hp.last_json(out.split("writing")[0])["perms"]
        assert perms == ["r--s", "r--s"], perms  # control + data, nothing writable
        assert "writing" in out and "WROTE" not in out, (out, err)
        assert proc.returncode == -signal.SIGSEGV, (proc.returncode, err)
        with Reader(shm_name) as r:  # the segment is intact
            assert r.get("/s/a").decoded == "secret"
    finally:
        pub.close()


# -- ownership and mode of segments (issue 16) ---------------------------------------------------


def _second_uid_problem() -> str:
    if os.geteuid() != 0:
        return "needs root to run a squatter as a second uid (nobody) and to own segments as another uid"
    try:
        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        return "needs the unprivileged account nobody:nogroup as the second uid"
    if shutil.which("setpriv") is None:
        return "needs setpriv(1) (util-linux) to run a process as the second uid"
    return ""


needs_second_uid = pytest.mark.skipif(bool(_second_uid_problem()), reason=_second_uid_problem() or "-")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NOBODY_UID = 65534


def _shm(name: str) -> str:
    return f"/dev/shm/shmks.{name}"


class Squatter:
    """A shell of another uid that creates ``path`` first and keeps it open read-write
    (fd 3), as in issue 16. ``scribble()`` writes through that old descriptor."""

    def __init__(self, path: str, mode: str, uid_args=NOBODY, size: int = 4096, lock: bool = False) -> None:
        self.path = path
        script = (
            f"truncate -s {size} {path} && chmod {mode} {path} && exec 3<>{path} && "
            + ("flock -x 3 && " if lock else "")
            + "echo ready && "
            "read cmd && printf EVILEVILEVILEVIL >&3 && echo wrote && exec sleep 600"
        )
        self.proc = subprocess.Popen(
            [*uid_args, "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ready", f"squatter failed to start: {line!r}"

    def scribble(self) -> None:
        self.proc.stdin.write("go\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        assert self.proc.stdout.readline().strip() == "wrote"  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        hp.stop(self.proc)


def _cli(args, env, timeout=60):
    return subprocess.run(
        [hp.PYTHON, "-m", "shmkeyspace", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, (
        res.returncode,
        res.stderr,
    )
    assert lines[0].startswith("shmkeyspace: error: "), lines[0]
    return lines[0][len("shmkeyspace: error: ") :]


def _squat_message(name: str, mode: str) -> str:
    path = _shm(name)
    return (
        f"snapshot {name!r}: control segment {path} is owned by uid 65534 (nobody), mode 0{mode}, "
        f"not by uid 0 (root): refusing it; remove it (as root or its owner: shmkeyspace unlink {name}, "
        f"or rm {path}) or choose another --name"
    )


@needs_second_uid
@pytest.mark.parametrize("mode", ["666", "600"])
def test_squatted_control_segment_the_writer_refuses(mode, etcd_server, prefix, shm_name, python_env):
    """Issue 16's reproduction: nobody creates the control segment first (and keeps it
    open); `shmkeyspace writer` as root refuses it with one clear line, touching nothing."""
    path = _shm(shm_name)
    sq = Squatter(path, mode)
    try:
        res = _cli(
            ["writer", "--endpoints", etcd_server.endpoint, "--prefix", prefix, "--name", shm_name],
            python_env,
        )
        assert _error_line(res) == _squat_message(shm_name, mode)
        st = os.stat(path)  # untouched: not chmod'ed, not written, no data segment
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_size) == (NOBODY_UID, int(mode, 8), 4096)
        with open(path, "rb") as f:
            assert f.read() == bytes(4096)
        assert hp.shm_files(shm_name) == [f"shmks.{shm_name}"]
        # The same refusal in the library.
        with pytest.raises(UntrustedSegmentError) as ei:
            publisher.Publisher(shm_name)
        assert str(ei.value) == _squat_message(shm_name, mode)
        assert isinstance(ei.value, PermissionError)
        # The remedy it names works: remove it, and a writer starts.
        assert _cli(["unlink", shm_name], python_env).returncode == 0
        pub = _publish_small(shm_name)
        try:
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
            sq.scribble()  # the squatter's old descriptor points at the removed file
            with Reader(shm_name) as r:
                assert r.get("/s/a").decoded == "secret"
        finally:
            pub.close()
    finally:
        sq.stop()


class LockHolder:
    """A shell of another uid that opens ``paths`` read-only and holds ``flock -x`` on each
    (as any reader of a 0644 snapshot could), and tries to open ``denied`` (the lock file)."""

    def __init__(self, paths, denied: str, uid_args=NOBODY) -> None:
        opens = " && ".join(f"exec {3 + i}<{p} && flock -x {3 + i}" for i, p in enumerate(paths))
        script = (
            f"{opens} && if (exec 9<{denied}) 2>/dev/null; then echo opened; else echo denied; fi && "
            "echo ready && exec sleep 600"
        )
        self.proc = subprocess.Popen([*uid_args, "sh", "-c", script], stdout=subprocess.PIPE, text=True)
        self.lock_file = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ready", f"lock holder failed to start: {self.lock_file!r} {line!r}"

    def stop(self) -> None:
        hp.stop(self.proc)


@needs_second_uid
def test_a_reader_holding_locks_cannot_stop_the_writer(shm_name, python_env):
    """Issue 21: a reader of another uid that can open the segments (0644) and holds
    ``flock -x`` on the control and data segments cannot open the writer lock file, and
    neither a restarted writer nor ``shmkeyspace unlink`` is blocked by its locks."""
    pub = _publish_small(shm_name, mode=0o644)
    ctrl = _shm(shm_name)
    holder = LockHolder([ctrl, ctrl + ".1"], writerlock.lock_path(shm_name))
    try:
        assert holder.lock_file == "denied"
        st = os.stat(writerlock.lock_path(shm_name))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
        assert writerlock.writer_is_running(shm_name)
        pub.close()
        assert not writerlock.writer_is_running(shm_name)
        # A restarted writer takes the name over in place, under the holder's locks.
        pub = _publish_small(shm_name, mode=0o644)
        with Reader(shm_name) as r:
            assert r.get("/s/a").decoded == "secret"
        pub.close()
        res = _cli(["unlink", shm_name], python_env)
        assert res.returncode == 0, res.stderr
        assert hp.shm_files(shm_name) == []
        assert not os.path.exists(writerlock.lock_path(shm_name))
    finally:
        holder.stop()
        pub.close()


@needs_second_uid
def test_a_squatted_lock_file_is_refused_with_its_owner(shm_name, python_env):
    """Someone else's file at the lock file's path (held locked, as a squatter would):
    the writer refuses it in one line naming its owner, `unlink` says whose lock it is
    and that rm removes it; after rm the name is usable again."""
    path = writerlock.lock_path(shm_name)
    sq = Squatter(path, "600", lock=True)
    try:
        with pytest.raises(UntrustedSegmentError) as ei:
            publisher.Publisher(shm_name)
        assert str(ei.value) == (
            f"snapshot {shm_name!r}: writer lock file {path} is owned by uid 65534 (nobody), mode 0600, "
            f"not by uid 0 (root): refusing it; remove it (as root or its owner: rm {path}) "
            "or choose another --name"
        )
        line = _error_line(_cli(["unlink", shm_name], python_env))
        assert line == (
            f"snapshot {shm_name!r}: a process holds the writer lock file {path}, which is owned by uid "
            f"65534 (nobody), mode 0600, not a writer this user trusts: stop that process, or if the file "
            f"is not your writer's, remove it with rm {path}"
        )
        os.unlink(path)
        pub = _publish_small(shm_name)  # the name is usable again
        pub.close()
    finally:
        sq.stop()


@needs_second_uid
def test_squatted_data_segment_is_replaced_not_reused(shm_name):
    """A leftover data generation another uid created (and holds open, world-writable)
    is unlinked and created again exclusively: its descriptor cannot reach the snapshot."""
    sq = Squatter(_shm(shm_name) + ".1", "666", size=1 << 20)
    try:
        pub = _publish_small(shm_name)  # generation 1
        try:
            st = os.stat(_shm(shm_name) + ".1")
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
            sq.scribble()
            with Reader(shm_name) as r:
                assert r.get("/s/a").decoded == "secret"
        finally:
            pub.close()
    finally:
        sq.stop()


UNPRIVILEGED_PUBLISHER = r"""
import json, os, sys
from shmkeyspace import segment, publisher, writerlock
from shmkeyspace.errors import UntrustedSegmentError
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.snapshot import pack_entry
name = sys.argv[1]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
try:
    pub = publisher.Publisher(name)
    b = ImageBuilder()
    b.reset([(b"/s/a", pack_entry(b"/s/a", "x", 1, 1, 1, 0))], 1)
    parts, total = b.parts()
    pub.publish(parts, total, 1, 1)
    print(json.dumps({"ok": pub.gen}))
except UntrustedSegmentError as exc:
    print(json.dumps({"error": type(exc).__name__, "msg": str(exc)}))
"""


@needs_second_uid
@pytest.mark.parametrize("which", ["control", "data"])
def test_unprivileged_writer_refuses_another_users_segment(which, shm_name):
    """Without root a writer can neither open (0600) nor remove (sticky /dev/shm) a
    segment of another uid: it says whose it is instead of failing obscurely."""
    path = _shm(shm_name) + ("" if which == "control" else ".1")
    sq = Squatter(
        path,
        "600" if which == "control" else "644",
        uid_args=["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups"],
    )
    try:
        proc = hp.spawn(UNPRIVILEGED_PUBLISHER, shm_name)
        out, err = proc.communicate(timeout=60)
        res = hp.last_json(out)
        assert res.get("error") == "UntrustedSegmentError", (res, err)
        if which == "control":
            want = f"control segment {path} already exists and is a file owned by uid 4242 (?), mode 0600, not owned by uid 65534 (nobody)"
        else:
            want = f"data segment {path} already exists and is a file owned by uid 4242 (?), mode 0644, and cannot be removed"
        assert res["msg"].startswith(f"snapshot {shm_name!r}: {want}: refusing it; remove it"), res["msg"]
    finally:
        sq.stop()
        os.unlink(path)


def _public_snapshot(name: str) -> publisher.Publisher:
    """A root-owned snapshot others may read (0644), for a squatter to copy."""
    return _publish_small(name, mode=0o644)


def _as_nobody(*cmd: str) -> None:
    subprocess.run([*NOBODY, *cmd], check=True, timeout=60)


@needs_second_uid
def test_readers_refuse_an_attacker_owned_control_segment(shm_name, python_env, monkeypatch):
    """nobody plants a valid-looking snapshot (control + data, both its own): a root
    reader refuses it, naming owner and mode and how to trust that uid on purpose."""
    src = shm_name + "-src"
    pub = _public_snapshot(src)
    try:
        _as_nobody("cp", _shm(src), _shm(shm_name))
        _as_nobody("cp", _shm(src) + ".1", _shm(shm_name) + ".1")
    finally:
        pub.close(unlink=True)
    path = _shm(shm_name)
    want = (
        f"snapshot {shm_name!r}: control segment {path} is owned by uid 65534 (nobody), mode 0644, "
        "not by uid 0 (root): refusing it; if uid 65534 runs the writer you mean to read, trust it with "
        "Reader(..., writer_uid=65534) or SHMKEYSPACE_WRITER_UID=65534; otherwise remove it (as root or its "
        f"owner: shmkeyspace unlink {shm_name}, or rm {path}) and restart its writer"
    )
    monkeypatch.delenv("SHMKEYSPACE_WRITER_UID", raising=False)
    with pytest.raises(UntrustedSegmentError) as ei:
        Reader(shm_name)
    assert str(ei.value) == want
    env = {k: v for k, v in python_env.items() if k != "SHMKEYSPACE_WRITER_UID"}
    assert _error_line(_cli(["get", shm_name, "/s/a"], env)) == want
    # Trusting that uid on purpose: argument (uid or name), environment, CLI.
    for uid in (NOBODY_UID, "nobody", "65534"):
        with Reader(shm_name, writer_uid=uid) as r:
            assert r.get("/s/a").decoded == "secret"
    monkeypatch.setenv("SHMKEYSPACE_WRITER_UID", "nobody")
    with Reader(shm_name) as r:
        assert r.get("/s/a").decoded == "secret"
    res = _cli(["get", shm_name, "/s/a", "--json"], {**env, "SHMKEYSPACE_WRITER_UID": "65534"})
    assert res.returncode == 0 and '"secret"' in res.stdout, res.stderr
    # Trusting someone else does not help.
    with pytest.raises(UntrustedSegmentError, match="not by uid 0 \\(root\\) or uid 4242"):
        Reader(shm_name, writer_uid=4242)
    for bad in ("no-such-user-x", -1, 2**32, 1.5):
        with pytest.raises(InvalidSettingError):
            Reader(shm_name, writer_uid=bad)  # type: ignore[arg-type]


@needs_second_uid
def test_readers_refuse_an_attacker_data_segment_named_by_a_trusted_control_block(shm_name):
    """A root-owned (hand-crafted) control block whose record names a data segment
    nobody created: refused, even when nobody is a trusted writer uid."""
    src = shm_name + "-src"
    pub = _public_snapshot(src)
    try:
        _as_nobody("cp", _shm(src) + ".1", _shm(shm_name) + ".1")
        shutil.copyfile(_shm(src), _shm(shm_name))  # root's copy of a valid control block
        os.chmod(_shm(shm_name), 0o600)
    finally:
        pub.close(unlink=True)
    want = (
        f"snapshot {shm_name!r}: data segment {_shm(shm_name)}.1 is owned by uid 65534 (nobody), mode 0644, "
        "not by uid 0 (root): refusing it; its control segment's owner (who creates every data segment) "
        f"did not create it; someone else did, so remove it (as root or its owner: shmkeyspace unlink "
        f"{shm_name}, or rm {_shm(shm_name)}.1)"
    )
    for uid in (None, NOBODY_UID):
        with pytest.raises(UntrustedSegmentError) as ei:
            Reader(shm_name, writer_uid=uid)
        assert str(ei.value) == want


@pytest.mark.parametrize(
    "which, mode", [("control", 0o666), ("control", 0o620), ("control", 0o602), ("data", 0o646)]
)
def test_readers_refuse_segments_writable_by_others(which, mode, shm_name):
    pub = _publish_small(shm_name)
    try:
        path = _shm(shm_name) + ("" if which == "control" else ".1")
        os.chmod(path, mode)
        with pytest.raises(UntrustedSegmentError) as ei:
            Reader(shm_name)
        assert str(ei.value).startswith(
            f"snapshot {shm_name!r}: {which} segment {path} is owned by uid {os.geteuid()} "
            f"({pwd.getpwuid(os.geteuid()).pw_name}), mode 0{mode:o}: writable by users other than its owner, "
            "who could rewrite it at any time; refusing it; remove it"
        ), str(ei.value)
    finally:
        pub.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_unprivileged_reader_refuses_world_writable_root_segment(shm_name):
    """Ownership by root is trusted, a mode that lets others write is not."""
    pub = _publish_small(shm_name, mode=0o640, gid=65534)
    try:
        assert _run_unprivileged(shm_name) == {"ok": "secret"}
        os.chmod(_shm(shm_name), 0o666)
        proc = hp.spawn(UNPRIVILEGED_READER.replace("except PermissionError", "except OSError"), shm_name)
        out, err = proc.communicate(timeout=60)
        res = hp.last_json(out)
        assert (
            res.get("error") == "UntrustedSegmentError"
            and "writable by users other than its owner" in res["msg"]
        ), (res, err)
    finally:
        pub.close()


def test_writer_refuses_its_own_segment_when_others_may_write_it(shm_name):
    _publish_small(shm_name).close()
    os.chmod(_shm(shm_name), 0o660)
    with pytest.raises(UntrustedSegmentError, match="mode 0660: writable by users other than its owner"):
        publisher.Publisher(shm_name)
    with pytest.raises(InvalidSettingError, match="readers refuse such segments"):
        publisher.Publisher(shm_name + "-m", mode=0o664)
    assert hp.shm_files(shm_name + "-m") == []


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_symlinks_and_fifos_under_a_segment_name_are_refused(kind, shm_name, tmp_path):
    path = _shm(shm_name)
    if kind == "symlink":
        target = tmp_path / "target"
        target.write_bytes(b"precious")
        os.symlink(target, path)
        link = trust.describe(os.lstat(path))
        want = re.escape(f"control segment {path} is a symbolic link {link}: refusing to follow it")
    else:
        os.mkfifo(path, 0o600)
        want = "is not a regular file"
    try:
        with pytest.raises(UntrustedSegmentError, match=want):
            Reader(shm_name)  # a FIFO must not block the open
        with pytest.raises(UntrustedSegmentError, match=want):
            publisher.Publisher(shm_name)
        assert not writerlock.writer_is_running(shm_name)
        if kind == "symlink":
            assert target.read_bytes() == b"precious"
    finally:
        os.unlink(path)


@needs_second_uid
def test_publishing_for_another_uid(shm_name, monkeypatch):
    """Publisher(uid=...) (root only): segments owned by that uid; readers trust it only when told."""
    monkeypatch.delenv("SHMKEYSPACE_WRITER_UID", raising=False)
    pub = _publish_small(shm_name, uid="nobody")
    try:
        assert {os.stat("/dev/shm/" + f).st_uid for f in hp.shm_files(shm_name)} == {NOBODY_UID}
        with pytest.raises(UntrustedSegmentError, match="owned by uid 65534 \\(nobody\\)"):
            Reader(shm_name)
        with Reader(shm_name, writer_uid="nobody") as r:
            assert r.get("/s/a").decoded == "secret"
    finally:
        pub.close()
    with pytest.raises(UntrustedSegmentError, match="not by uid 0 \\(root\\)"):
        publisher.Publisher(shm_name)  # root's own writer does not take over nobody's segment
    publisher.Publisher(shm_name, uid=NOBODY_UID).close()  # told to publish for nobody: it does


@needs_second_uid
def test_gunicorn_workers_trust_the_configured_and_the_started_writer_uid(shm_name, monkeypatch):
    import shmkeyspace.gunicorn as g

    monkeypatch.setattr(g, "_overrides", {})
    monkeypatch.setattr(g, "_reader", None)
    monkeypatch.setattr(g, "_supervisor", None)
    monkeypatch.delenv("SHMKEYSPACE_WRITER_UID", raising=False)
    monkeypatch.setenv("SHMKEYSPACE_NAME", shm_name)
    pub = _publish_small(shm_name, uid=NOBODY_UID)
    try:
        with pytest.raises(UntrustedSegmentError):
            g.reader()
        monkeypatch.setenv("SHMKEYSPACE_WRITER_UID", "nobody")
        assert g.settings().writer_uid == "nobody"
        assert g.reader().get("/s/a").decoded == "secret"
        g.worker_exit(None, None)
        monkeypatch.delenv("SHMKEYSPACE_WRITER_UID")
        g.configure(writer_uid="65534")
        assert g.reader().get("/s/a").decoded == "secret"
        g.worker_exit(None, None)
        # The hooks' own writer: its uid (the master's) is what workers are told to trust.
        g.configure(writer_uid=None, prefix="/p")
        sup = g.WriterSupervisor(g.settings())
        assert sup.writer_uid == os.geteuid()
        monkeypatch.setattr(sup, "writer_uid", NOBODY_UID)  # as if it ran as nobody
        monkeypatch.setattr(g, "_supervisor", sup)
        assert g.reader().get("/s/a").decoded == "secret"
        g.worker_exit(None, None)
    finally:
        pub.close()


def test_trailing_slash_prefix_mirrors_exactly_the_keys_under_it(client, prefix, shm_name):
    """'/services/' mirrors the keys under /services/ only; '/services' (Gazette's plain
    prefix) also takes /services-old/... and /servicesecret: both checked against etcd."""
    base = f"{prefix}/services"
    for k in ("/a", "/b/c", "-old/x", "ecret/y", "", "/"):
        client.put(base + k, "v" + k)
    plain = shm_name + "-plain"
    try:
        with (
            Writer(shm_name, base + "/", client=client).start() as w,
            Writer(plain, base, client=client).start(),
        ):
            with Reader(shm_name) as r, Reader(plain) as rp:

                def etcd_keys(p: str) -> list:
                    return sorted(m.key.decode() for _, m in client.get_prefix(p))

                assert (
                    [e.key for e in r.prefixed("")]
                    == etcd_keys(base + "/")
                    == [base + k for k in ("/", "/a", "/b/c")]
                )
                assert [e.key for e in rp.prefixed("")] == etcd_keys(base) and len(etcd_keys(base)) == 6
                # Live changes: a sibling is never taken, a child is.
                client.put(base + "-old/z", "sibling")
                rev = int(client.put(base + "/d", "child").header.revision)
                assert r.wait_for_revision(rev, 30) and rp.wait_for_revision(rev, 30)
                assert [e.key for e in r.prefixed("")] == etcd_keys(base + "/")
                assert r.get(base + "-old/z") is None and r.get(base + "/d").decoded == b"child"
                assert [e.key for e in rp.prefixed("")] == etcd_keys(base)
                assert w.keyspace.root == base + "/"
    finally:
        writerlock.unlink_all(plain)
