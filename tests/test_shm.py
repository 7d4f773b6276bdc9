"""Segments, publication and Reader behaviour: exclusivity, crashes, corruption, fork,
snapshot views, and a Writer publishing a real etcd prefix."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import time

import pytest
import torture
from conftest import PYTHON

from shmkeyspace import Reader, Writer, publisher, segment, writerlock
from shmkeyspace import reader as reader_mod
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.errors import (
    CorruptSegmentError,
    InvalidNameError,
    ReaderClosedError,
    SegmentNotFoundError,
    ShmKeyspaceError,
    SnapshotExpiredError,
    WriterExistsError,
)
from shmkeyspace.snapshot import ImageView, pack_entry


def _publish_small(pub: publisher.Publisher, b: ImageBuilder, rev: int, n: int = 10) -> None:
    b.reset([(b"/s/%04d" % i, pack_entry(b"/s/%04d" % i, [rev, i], rev, rev, 1, 0)) for i in range(n)], rev)
    parts, total = b.parts()
    pub.publish(parts, total, rev, len(b))


def test_second_writer_is_refused_naming_the_first(shm_name, python_env):
    pub = publisher.Publisher(shm_name)
    try:
        with pytest.raises(WriterExistsError, match=rf"pid {os.getpid()}"):
            publisher.Publisher(shm_name)
        # ... also from another process
        code = (
            f"from shmkeyspace import publisher\ntry:\n publisher.Publisher({shm_name!r})\n"
            f"except Exception as e:\n print(type(e).__name__, e)"
        )
        out = subprocess.run([PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith("WriterExistsError") and f"pid {os.getpid()}" in out.stdout, out
        assert writerlock.writer_is_running(shm_name)
        with pytest.raises(WriterExistsError):
            writerlock.unlink_all(shm_name)
    finally:
        pub.close()
    assert not writerlock.writer_is_running(shm_name)
    publisher.Publisher(shm_name).close()  # released: a new writer may start


def test_reader_errors_are_clear(shm_name):
    with pytest.raises(SegmentNotFoundError, match=shm_name):
        Reader(shm_name)
    for bad in ("", "a/b", "..", "a..b", "x" * 201, "a\0b", ".hidden", "-x"):
        with pytest.raises(InvalidNameError, match="invalid snapshot name|must be str"):
            Reader(bad)
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        # Control segment exists but nothing is published yet.
        with pytest.raises(SegmentNotFoundError, match="no publication yet"):
            Reader(shm_name)
        b = ImageBuilder()
        _publish_small(pub, b, 5)
        r = Reader(shm_name)
        r.close()
        with pytest.raises(ShmKeyspaceError, match="closed"):
            r.get("/s/0001")
        with pytest.raises(TypeError, match="key must be str or bytes"):
            Reader(shm_name).get(42)


@pytest.mark.parametrize("impl", reader_mod.IMPLEMENTATIONS)
def test_closed_reader_invalidates_its_views(shm_name, impl):
    pub = publisher.Publisher(shm_name)
    try:
        _publish_small(pub, ImageBuilder(), 5)
        r = Reader(shm_name, implementation=impl)
        views = [r.snapshot(), r.snapshot(copy=True)]
        assert all(v.get("/s/0001") is not None for v in views)
        r.close()
        r.close()  # idempotent
        for v in views:
            for query in (
                lambda: v.get("/s/0001"),
                lambda: v.range("", None),
                lambda: len(v),
                lambda: list(v),
            ):
                with pytest.raises(ReaderClosedError, match="closed"):
                    query()
        for query in (lambda: r.get("/s/0001"), lambda: r.prefixed("/s"), r.health, lambda: r.revision):
            with pytest.raises(ReaderClosedError, match="closed"):
                query()
    finally:
        pub.close(unlink=True)


def test_reader_bug_is_not_reported_as_corruption(shm_name, monkeypatch):
    """Only what memory contents can cause is retried/turned into CorruptSegmentError:
    a TypeError or KeyError from a bug in the reader surfaces as itself."""
    pub = publisher.Publisher(shm_name)
    try:
        _publish_small(pub, ImageBuilder(), 5)
        with Reader(shm_name, implementation="python", cache_size=0) as r:
            for exc in (TypeError("bug"), KeyError("bug")):

                def broken(self, *a, exc=exc):
                    raise exc

                monkeypatch.setattr(ImageView, "lookup", broken)
                monkeypatch.setattr(ImageView, "range", broken)
                with pytest.raises(type(exc), match="bug"):
                    r.get("/s/0001")
                with pytest.raises(type(exc), match="bug"):
                    r.range("/s/", None)
            monkeypatch.undo()
            assert r.get("/s/0001") is not None
    finally:
        pub.close(unlink=True)


def _kill_mid_publish(name: str) -> None:
    torture.publish_forever(name, 60000, 120.0)  # images up to ~60 MiB: copies take a while


def test_kill_9_mid_publication_keeps_last_snapshot(shm_name):
    """SIGKILL the writer while it copies an image (seq odd): readers answer from the
    last complete publication, health() says the writer is dead, a new writer takes over."""
    ctx = mp.get_context("spawn")
    killed_mid = 0
    for _attempt in range(3):
        p = ctx.Process(target=_kill_mid_publish, args=(shm_name,))
        p.start()
        try:
            r = Reader(shm_name, wait=60)
            words = r._words
            start = r.revision
            deadline = time.monotonic() + 60
            # Let it publish a few revisions, then strike while seq is odd.
            while time.monotonic() < deadline and (
                r.revision < start + 2 or words[segment.OFF_SEQ // 8] % 2 == 0
            ):
                pass
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        seq = words[segment.OFF_SEQ // 8]
        killed_mid += seq % 2
        c = torture.Checker(60000)
        rev = r.revision
        with r.snapshot() as s:
            assert s.revision == rev
            c.entries(rev, s.range(b"/t/d", b"/t/l"), b"/t/d", b"/t/l")
            meta = s.get("/t/meta")
            big = s.get("/t/big")
        assert meta.decoded == rev and c.bad == [], c.bad
        assert big.mod_revision == rev and len(big.decoded) == torture.big_size(rev, 60000)
        c.entry(r.get(torture.k_key(3)), torture.k_key(3))
        assert c.bad == []
        h = r.health()
        assert not h.writer_alive and h.revision == rev
        r.close()
        if killed_mid >= 2:
            break
    assert killed_mid, "never caught the writer in the middle of a publication"
    # A new writer takes over the name; an old Reader follows it.
    r = Reader(shm_name)
    pub = publisher.Publisher(shm_name)
    try:
        _publish_small(pub, ImageBuilder(), 10**6)
        assert r.revision == 10**6 and r.get("/s/0003").decoded == [10**6, 3]
        assert r.health().writer_alive
    finally:
        pub.close()
        r.close()


@pytest.mark.parametrize(
    "damage",
    [
        "ctrl-magic",
        "ctrl-version",
        "data-magic",
        "image-magic",
        "image-version",
        "truncated-data",
        "random-image",
        "zero-table",
    ],
)
def test_corrupt_segments_raise_clear_errors(shm_name, damage):
    pub = publisher.Publisher(shm_name)
    b = ImageBuilder()
    _publish_small(pub, b, 7, n=200)
    rec = segment.RECORD.unpack_from(
        pub.ctrl, segment.OFF_RECORDS + ((pub.seq >> 1) & 1) * segment.RECORD.size
    )
    gen, seg_size, off, length = rec[:4]
    pub.close()
    ctrl_path = segment.shm_path(segment.ctrl_name(shm_name))
    data_path = segment.shm_path(segment.data_name(shm_name, gen))

    def poke(path, at, data):
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(data)

    if damage == "ctrl-magic":
        poke(ctrl_path, 0, b"GARBAGE!")
    elif damage == "ctrl-version":
        poke(ctrl_path, 8, (99).to_bytes(4, "little"))
    elif damage == "data-magic":
        poke(data_path, 0, b"XXXXXXXX")
    elif damage == "image-magic":
        poke(data_path, off, b"XXXXXXXX")
    elif damage == "image-version":
        poke(data_path, off + 8, (42).to_bytes(4, "little"))
    elif damage == "truncated-data":
        os.truncate(data_path, seg_size // 3)
    elif damage == "random-image":
        poke(data_path, off + 128, os.urandom(length - 128))
    elif damage == "zero-table":
        table_off = int.from_bytes(open(data_path, "rb").read()[off + 48 : off + 56], "little")
        poke(data_path, off + table_off, bytes(1024))
    with pytest.raises((CorruptSegmentError, SegmentNotFoundError)) as ei:
        with Reader(shm_name, cache_size=0) as r:
            for i in range(200):
                r.get(b"/s/%04d" % i)
            r.range("/s/", "/s/9")
            r.prefixed("/s/0")
            raise AssertionError("a damaged snapshot answered every query")
    assert isinstance(ei.value, ShmKeyspaceError) and str(ei.value)


def test_reader_survives_fork(shm_name):
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        b = ImageBuilder()
        _publish_small(pub, b, 3)
        r = Reader(shm_name)
        assert r.get("/s/0002").decoded == [3, 2]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: the inherited Reader keeps working and follows the writer
            try:
                os.close(rfd)
                ok = r.get("/s/0002").decoded in ([3, 2], [4, 2])  # the parent may have published
                deadline = time.monotonic() + 20
                while r.revision < 4 and time.monotonic() < deadline:
                    time.sleep(0.01)
                ok = ok and r.get("/s/0002").decoded == [4, 2]
                os.write(wfd, b"ok" if ok else b"bad")
            finally:
                os._exit(0)
        os.close(wfd)
        _publish_small(pub, b, 4)
        assert os.read(rfd, 10) == b"ok"
        os.waitpid(pid, 0)
        assert r.get("/s/0002").decoded == [4, 2]


def test_snapshot_views_are_consistent_or_expire(shm_name):
    b = ImageBuilder()
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish_small(pub, b, 1)
        r = Reader(shm_name)
        with r.snapshot() as s, r.snapshot(copy=True) as c:
            assert s.get("/s/0001").decoded == [1, 1]
            _publish_small(pub, b, 2)  # one publication: the view's buffer is untouched
            assert s.get("/s/0001").decoded == [1, 1] and len(s) == 10
            assert r.get("/s/0001").decoded == [2, 1]
            _publish_small(pub, b, 3)  # second: the buffer was rewritten
            with pytest.raises(SnapshotExpiredError, match="copy=True"):
                s.get("/s/0001")
            assert [e.decoded for e in c.range("/s/", None)] == [[1, i] for i in range(10)]
            assert c.revision == 1 and [e.key for e in c] == [f"/s/{i:04d}" for i in range(10)]
        r.close()


def test_wait_for_revision_wakes_on_publication(shm_name):
    b = ImageBuilder()
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish_small(pub, b, 1)
        r = Reader(shm_name)
        assert r.wait_for_revision(1, 0) is True
        assert r.wait_for_revision(2, 0.05) is False
        ctx = mp.get_context("fork")
        p = ctx.Process(target=lambda: (time.sleep(0.2), _publish_small(pub, b, 9)))
        # The child publishes through the inherited mapping (the parent keeps the lock).
        p.start()
        assert r.wait_for_revision(9, 20) is True
        p.join(10)
        assert r.revision == 9


def test_writer_mirrors_etcd_prefix(client, prefix, shm_name):
    """Writer + Reader end to end: load, updates, deletes, decode failure, health."""
    for i in range(50):
        client.put(f"{prefix}/k{i:03d}", json.dumps({"i": i}))
    client.put(prefix + "x/outside", "1")  # shares the string prefix: Gazette semantics include it
    from shmkeyspace.decoders import json as jdec

    w = Writer(shm_name, prefix, client=client, decoder=jdec, apply_delay=0.01).start()
    try:
        r = Reader(shm_name)
        assert len(r) == 51
        assert r.get(f"{prefix}/k007").decoded == {"i": 7}
        assert [e.key for e in r.prefixed(prefix + "/k00")] == [f"{prefix}/k{i:03d}" for i in range(10)]
        client.delete(f"{prefix}/k001")
        client.put(f"{prefix}/k002", "not json")
        rev = client.put(f"{prefix}/k003", json.dumps([1, 2])).header.revision
        assert r.wait_for_revision(rev, 10)
        assert r.get(f"{prefix}/k001") is None and r.get(f"{prefix}/k002") is None
        e = r.get(f"{prefix}/k003")
        assert e.decoded == [1, 2] and e.mod_revision == rev and e.version == 2
        rev = client.put(f"{prefix}/k002", json.dumps("fixed")).header.revision
        assert r.wait_for_revision(rev, 10) and r.get(f"{prefix}/k002").decoded == "fixed"
        # The mirror equals etcd at the published revision, key by key.
        resp = client.get_range_response(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1), revision=r.revision)
        with r.snapshot() as s:
            got = [(e.key, e.mod_revision, e.create_revision, e.version) for e in s.prefixed(prefix)]
        want = [(kv.key.decode(), kv.mod_revision, kv.create_revision, kv.version) for kv in resp.kvs]
        assert got == want
        h = r.health()
        assert h.writer_alive and h.writer_pid == os.getpid() and h.keys == 50 and h.heartbeat_age < 5
    finally:
        w.stop()
    h = r.health()
    assert not h.writer_alive and h.keys == 50  # the last snapshot stays readable
    r.close()


def test_readers_never_parse_shared_memory_in_place(shm_name, monkeypatch):
    """Every unpack a query does runs on a private bytes copy, never on a view of the
    mapping: C/Rust parsers assume their input holds still, and the writer may be
    rewriting it (the fenced-path soak segfaulted when entries were parsed in place).
    The seqlock then decides whether the copy is usable."""
    from shmkeyspace import snapshot as snapshot_mod

    seen = []

    def recording_unpackb(data, *a, **kw):
        seen.append(type(data))
        return real(data, *a, **kw)

    real = snapshot_mod.unpackb
    monkeypatch.setattr(snapshot_mod, "unpackb", recording_unpackb)
    b = ImageBuilder()
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish_small(pub, b, 1, n=200)
        # An out-of-key-order arena too (the non-contiguous range path).
        b.apply({b"/s/0005": pack_entry(b"/s/0005", "moved", 2, 2, 1, 0)}, 2)
        parts, total = b.parts()
        pub.publish(parts, total, 2, len(b), stable=b.stable_span())
        for cache in (0, 16):
            with Reader(shm_name, cache_size=cache, implementation="python") as r:
                r._fence = cache == 16  # the fenced (aarch64) path as well
                assert r.get("/s/0005").decoded == "moved" and r.get("/s/0100").decoded == [1, 100]
                assert len(r.range("/s/0000", "/s/0010")) == 10 and len(r.prefixed("/s/01")) == 100
                with r.snapshot() as s:
                    assert s.get("/s/0007").decoded == [1, 7] and len(s.range("/s/0190", None)) == 10
        assert seen and set(seen) == {bytes}, set(seen)


def test_publisher_is_a_context_manager(shm_name):
    """Leaving the block releases the writer lock; segments stay unless unlink_on_close."""
    b = ImageBuilder()
    with publisher.Publisher(shm_name) as pub:
        _publish_small(pub, b, 1)
        assert writerlock.writer_is_running(shm_name)
    assert not writerlock.writer_is_running(shm_name)
    with Reader(shm_name) as r:  # the last snapshot stays readable, its writer dead
        assert r.revision == 1 and not r.health().writer_alive
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish_small(pub, ImageBuilder(), 2)
        pub.close(unlink=False)  # an explicit choice wins; closing twice is harmless
    assert segment.segment_files(shm_name)
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish_small(pub, ImageBuilder(), 3)
    assert segment.segment_files(shm_name) == []


def test_publish_from_publishes_nothing_when_fill_fails(shm_name):
    """Publisher.publish_from writes into a new generation before taking the seqlock;
    a fill that raises leaves readers on the last snapshot, and the next publications
    (from a fill, from parts, after reserve_spare) work."""
    b = ImageBuilder()
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish_small(pub, b, 1)
        with Reader(shm_name, cache_size=0) as r:
            b.reset([(b"/s/%04d" % i, pack_entry(b"/s/%04d" % i, "new", 2, 2, 1, 0)) for i in range(5)], 2)
            parts, total = b.parts()
            image = b"".join(bytes(p) for p in parts)

            def fill_half_then_fail(view, off):
                view[off : off + total // 2] = image[: total // 2]
                raise RuntimeError("the disk went away")

            with pytest.raises(RuntimeError):
                pub.publish_from(total, fill_half_then_fail, 2, len(b))
            assert (r.revision, len(r), r.get(b"/s/0003").decoded) == (1, 10, [1, 3])
            with pytest.raises(SegmentNotFoundError):
                pub.published()  # the new generation holds nothing published

            def fill(view, off):
                view[off : off + total] = image

            pub.publish_from(total, fill, 2, len(b))
            assert (r.revision, len(r), r.get(b"/s/0003").decoded) == (2, 5, "new")
            mv, off, n = pub.published()
            try:
                assert n == total and bytes(mv[off : off + n]) == image
            finally:
                mv.release()
            pub.reserve_spare()
            _publish_small(pub, b, 3, n=12)
            assert (r.revision, len(r), r.get(b"/s/0011").decoded) == (3, 12, [3, 11])
