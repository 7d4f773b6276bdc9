"""Security promises: validated names, private segment modes, permission errors that
say what is wrong, and read-only mappings in readers.

Permission checks run a child that drops root for uid/gid 65534 (nobody/nogroup)
after importing, so the child itself is real and unprivileged.
"""

from __future__ import annotations

import grp
import os
import signal
import stat

import helpers_procs as hp
import pytest

from shmkeyspace import Reader, Writer, segment
from shmkeyspace.errors import InvalidNameError
from shmkeyspace.snapshot import ImageBuilder, pack_entry

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


def _publish_small(name: str, **kw) -> segment.Publisher:
    pub = segment.Publisher(name, **kw)
    b = ImageBuilder()
    b.reset([(b"/s/a", pack_entry(b"/s/a", "secret", 1, 1, 1, 0))], 1)
    parts, total = b.parts()
    pub.publish(parts, total, 1, 1)
    return pub


@pytest.mark.parametrize("bad", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_invalid_names_are_refused_everywhere(bad):
    for make in (
        lambda: Reader(bad),
        lambda: segment.Publisher(bad),
        lambda: Writer(bad, "/p", endpoints="127.0.0.1:1"),  # refused before any etcd I/O
        lambda: segment.validate_name(bad),
        lambda: segment.unlink_all(bad),
        lambda: segment.writer_is_running(bad),
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
            segment.Publisher(bad)


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
        assert res.get("error") == "PermissionError", res
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
