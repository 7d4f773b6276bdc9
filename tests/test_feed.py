"""Change feed, watch, futex wake-ups and derived state, against a real etcd and real processes.

``changes()`` and ``watch()`` are checked against etcd's own history (a raw etcd
watch from the starting revision) under random churn of puts, deletes and
transactions, then across a compaction that forces the writer to reload.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import threading
import time

import helpers_procs as hp
import pytest

from shmkeyspace import futex
from shmkeyspace.embedded import free_port
from shmkeyspace.errors import ChangesTooOldError, CorruptSegmentError
from shmkeyspace.etcd import connect
from shmkeyspace.feed import ChangeLog, read_changes
from shmkeyspace.key_values import prefix_end
from shmkeyspace.reader import Reader
from shmkeyspace.writer import Writer

# -- the feed region on its own -----------------------------------------------------------------------


def _region_changes(log: ChangeLog, since: int):
    reg = log.region()
    return read_changes(reg, 0, len(reg), since, log.revision)


def test_changelog_sizes_floor_and_reads():
    log = ChangeLog(keep=3, max_bytes=1 << 20)
    log.record(10, None)  # the load: floor = 10
    log._check()
    assert _region_changes(log, 10) == [] and _region_changes(log, 10).revision == 10
    with pytest.raises(ChangesTooOldError) as ei:
        _region_changes(log, 9)
    assert (ei.value.since, ei.value.floor, ei.value.revision) == (9, 10, 10)
    log.record(11, {b"/b", b"/a"})
    log.record(13, {b"/c", b"\xff\xfe"})  # not UTF-8: stays bytes
    log.record(14, {b"/a"})
    log._check()
    assert _region_changes(log, 10) == ["/a", "/b", "/c", b"\xff\xfe"]  # raw-bytes key order
    assert _region_changes(log, 11) == ["/a", "/c", b"\xff\xfe"]
    assert _region_changes(log, 12) == ["/a", "/c", b"\xff\xfe"]
    assert _region_changes(log, 13) == ["/a"]
    assert _region_changes(log, 14) == [] and _region_changes(log, 99) == []
    log.record(15, {b"/d"})  # a fourth entry: the oldest goes, floor = 11
    log._check()
    assert log.floor == 11
    with pytest.raises(ChangesTooOldError):
        _region_changes(log, 10)
    assert _region_changes(log, 11) == ["/a", "/c", "/d", b"\xff\xfe"]
    # Bytes bound: one entry larger than the budget empties the log.
    small = ChangeLog(keep=100, max_bytes=64)
    small.record(1, None)
    small.record(2, {b"/x"})
    small.record(3, {f"/key-{i:04d}".encode() for i in range(50)})
    small._check()
    assert len(small) == 0 and small.floor == 3
    assert _region_changes(small, 3) == []
    with pytest.raises(ChangesTooOldError):
        _region_changes(small, 2)
    # keep=0: no feed at all, only "nothing since now" is answerable.
    off = ChangeLog(keep=0)
    off.record(5, {b"/x"})
    assert _region_changes(off, 5) == []
    with pytest.raises(ChangesTooOldError):
        _region_changes(off, 4)


def test_feed_region_corruption_is_detected():
    log = ChangeLog()
    log.record(1, None)
    log.record(2, {b"/a", b"/b"})
    reg = bytearray(log.region())
    for pos in (0, 12, 16, 30, 50):  # magic, count, floor, revision, table
        bad = bytearray(reg)
        bad[pos] ^= 0x41
        with pytest.raises(CorruptSegmentError):
            read_changes(bad, 0, len(bad), 1, 2)
    with pytest.raises(CorruptSegmentError):
        read_changes(reg, 0, len(reg) + 8, 1, 2)  # region past its buffer
    with pytest.raises(CorruptSegmentError):
        read_changes(reg, 0, len(reg), 1, 3)  # disagrees with the snapshot's revision
    bad = bytearray(reg)
    bad[-3] = 0xC1  # a body byte msgpack never uses: bodies are not checksummed, but parsed safely
    with pytest.raises(CorruptSegmentError):
        read_changes(bad, 0, len(bad), 1, 2)


# -- against etcd's history -------------------------------------------------------------------


def _history(client, prefix: str, start: int, end: int) -> list:
    """(mod_revision, key) of every event under ``prefix`` in (start, end], from etcd's watch."""
    q: "queue.Queue" = queue.Queue()
    wid = client.add_watch_prefix_callback(prefix, q.put, start_revision=start + 1)
    out = []
    try:
        while not out or out[-1][0] < end:
            resp = q.get(timeout=30)
            if isinstance(resp, BaseException):
                raise resp
            out.extend((int(ev.mod_revision), bytes(ev.key).decode()) for ev in resp.events)
    finally:
        client.cancel_watch(wid)
    return [e for e in out if e[0] <= end]


def _between(history, a: int, b: int, prefix: str = "") -> list:
    return sorted({k for r, k in history if a < r <= b and k.startswith(prefix)})


def _churn(c, prefix: str, rnd: random.Random, n: int, live: set) -> int:
    """n random operations under prefix/a and prefix/b; returns the last revision."""
    rev = 0
    for _ in range(n):
        op = rnd.random()
        key = f"{prefix}/{rnd.choice('ab')}/k{rnd.randrange(30):02d}"
        if op < 0.55:
            rev = int(c.put(key, json.dumps(rnd.random())).header.revision)
            live.add(key)
        elif op < 0.75 and live:
            victim = rnd.choice(sorted(live))
            live.discard(victim)
            rev = int(c.delete(victim, return_response=True).header.revision)
        else:
            keys = {
                f"{prefix}/{rnd.choice('ab')}/k{rnd.randrange(30):02d}" for _ in range(rnd.randrange(1, 6))
            }
            ops = []
            for k in sorted(keys):
                if k in live and rnd.random() < 0.3:
                    ops.append(c.transactions.delete(k))
                    live.discard(k)
                else:
                    ops.append(c.transactions.put(k, json.dumps(rnd.random())))
                    live.add(k)
            _, resps = c.transaction(compare=[], success=ops, failure=[])
            rev = max(int(getattr(r, r.WhichOneof("response")).header.revision) for r in resps)
        if rnd.random() < 0.1:
            time.sleep(rnd.uniform(0, 0.02))  # let some publications happen between operations
    return rev


def _newest(client, prefix: str) -> int:
    p = prefix.encode()
    return int(client.get_range_response(p, prefix_end(p), limit=1).header.revision)


def _connect_retrying(endpoint: str):
    """A client for a just-restarted etcd (its first gRPC connection can still fail)."""
    for attempt in range(50):
        try:
            return connect(endpoint)
        except ConnectionError:
            if attempt == 49:
                raise
            time.sleep(0.2)


def test_changes_and_watch_match_etcd_history(own_etcd, prefix, shm_name):
    rnd = random.Random()
    c = connect(own_etcd.endpoint)
    for i in range(10):
        c.put(f"{prefix}/a/k{i:02d}", "0")
    w = Writer(shm_name, prefix, endpoints=own_etcd.endpoint, apply_delay=0.003, changes_keep=100_000)
    items: list = []
    watch_errors: list = []
    stop_watch = threading.Event()

    def watcher(start: int) -> None:
        with Reader(shm_name) as wr:
            try:
                for rev, keys in wr.watch(prefix=f"{prefix}/a/", since=start, timeout=0.5):
                    items.append((rev, list(keys)))
                    if stop_watch.is_set():
                        return
                while not stop_watch.is_set():  # timed out while idle: carry on
                    for rev, keys in wr.watch(prefix=f"{prefix}/a/", since=items[-1][0] if items else start):
                        items.append((rev, list(keys)))
            except ChangesTooOldError as exc:
                watch_errors.append(exc)

    try:
        w.start()
        r = Reader(shm_name)
        start = r.revision
        assert r.changes(start) == [] and r.changes(start).revision == start
        with pytest.raises(ChangesTooOldError):
            r.changes(start - 1)  # the load is "everything"
        t = threading.Thread(target=watcher, args=(start,), daemon=True)
        t.start()
        live = {f"{prefix}/a/k{i:02d}" for i in range(10)}
        seen = [start]
        for _ in range(8):
            _churn(c, prefix, rnd, rnd.randrange(5, 30), live)
            seen.append(r.revision)  # whatever is published right now
        end = _newest(c, prefix)
        assert r.wait_for_revision(end, 30)
        hist = _history(c, prefix, start, end)
        checked = 0
        for a in sorted(set(seen)):
            ch = r.changes(a)
            assert ch.revision == end
            assert list(ch) == _between(hist, a, end), a
            checked += 1
        # The watch saw exactly etcd's history under prefix/a/, item by item.
        last_a = max(r_ for r_, k in hist if k.startswith(f"{prefix}/a/"))
        # (An item's revision is its publication's, which may also hold later /b/ events.)
        assert hp.wait_until(lambda: items and items[-1][0] >= last_a, 30), (items[-3:], last_a, watch_errors)
        prev = start
        for rev, keys in items:
            assert keys == _between(hist, prev, rev, f"{prefix}/a/"), (prev, rev)
            prev = rev
        assert not watch_errors

        # A compaction the writer has to reload across: cut it off (etcd moves to
        # another port), churn and compact there, then bring etcd back.
        before = r.revision
        own_etcd.kill()
        port = own_etcd.client_port
        own_etcd.client_port = free_port()
        own_etcd.start()
        other = _connect_retrying(own_etcd.endpoint)
        _churn(other, prefix, rnd, 20, live)
        newest = _newest(other, prefix)
        other.compact(newest)
        other.close()
        own_etcd.kill()
        own_etcd.client_port = port
        own_etcd.start()
        c.close()
        c = _connect_retrying(own_etcd.endpoint)
        assert r.wait_for_revision(newest, 60)
        with pytest.raises(ChangesTooOldError) as ei:
            r.changes(before)
        assert ei.value.floor >= newest
        assert hp.wait_until(lambda: watch_errors, 30), "the watch did not report the reload"
        # After the reload the feed answers again.
        reloaded = r.revision
        _churn(c, prefix, rnd, 15, live)
        end2 = _newest(c, prefix)
        assert r.wait_for_revision(end2, 30)
        hist2 = _history(c, prefix, reloaded, end2)
        assert list(r.changes(reloaded)) == _between(hist2, reloaded, end2)
        r.close()
    finally:
        stop_watch.set()
        w.stop()
        c.close()
    hp.report_counts("changes vs etcd history", checked=checked, watch_items=len(items))


# -- wake-ups across processes ----------------------------------------------------------------------

WAITER = r"""
import sys, time
from shmkeyspace.reader import Reader
name, target, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Reader(name) as r:
    print("ready", flush=True)
    t0 = time.monotonic()
    ok = r.wait_for_revision(target, timeout)
    print("done", ok, r.revision, round(time.monotonic() - t0, 3), flush=True)
"""

PUBLISHER = r"""
import signal, sys, time
from shmkeyspace import segment, publisher
from shmkeyspace.builder import ImageBuilder
name, rev = sys.argv[1], int(sys.argv[2])
p = publisher.Publisher(name)
b = ImageBuilder()
b.reset([], rev)
parts, n = b.parts()
p.publish(parts, n, rev, 0)
print("published", rev, flush=True)
for line in sys.stdin:
    rev = int(line)
    b.reset([], rev)
    parts, n = b.parts()
    p.publish(parts, n, rev, 0)
    print("published", rev, flush=True)
"""


def _spawn_publisher(name: str, rev: int):
    import subprocess

    proc = subprocess.Popen(
        [hp.PYTHON, "-c", PUBLISHER, name, str(rev)],
        env=hp.child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().split() == ["published", str(rev)]
    return proc


def test_wake_up_across_processes_and_a_killed_writer(shm_name):
    waiters = []
    pub = pub2 = None
    try:
        pub = _spawn_publisher(shm_name, 1)
        # Two waiters for revision 2, one for revision 3 (long timeouts).
        waiters.extend(hp.spawn(WAITER, shm_name, str(target), "60") for target in (2, 2, 3))
        for p in waiters:
            assert p.stdout.readline().strip() == "ready"
        pub.stdin.write("2\n")
        pub.stdin.flush()
        for p in waiters[:2]:
            ok, rev = p.stdout.readline().split()[1:3]
            assert (ok, rev) == ("True", "2")
        # One more waiter for revision 3 with a short timeout, then the writer dies:
        # whether its timeout ends before or after the kill, nobody publishes 3
        # until it has answered, and it must give up cleanly at revision 2 ...
        short = hp.spawn(WAITER, shm_name, "3", "1.0")
        waiters.append(short)
        assert short.stdout.readline().strip() == "ready"
        pub.send_signal(signal.SIGKILL)
        pub.wait(10)
        out = short.stdout.readline().split()
        assert out[:3] == ["done", "False", "2"], out
        assert short.wait(30) == 0
        # ... the other one sees the new writer's publication.
        pub2 = _spawn_publisher(shm_name, 2)
        pub2.stdin.write("3\n")
        pub2.stdin.flush()
        out = waiters[2].stdout.readline().split()
        assert out[:3] == ["done", "True", "3"], out
        assert waiters[2].wait(30) == 0
    finally:
        for p in (pub, pub2, *waiters):
            hp.stop(p)


def test_futex_on_a_read_only_mapping_is_kernel_sleep(shm_name):
    if not futex.AVAILABLE:
        pytest.skip("no futex on this platform")
    pub = _spawn_publisher(shm_name, 1)
    try:
        with Reader(shm_name) as r:
            # The word differs from what we claim to have seen: returns at once.
            t0 = time.monotonic()
            futex.wait(r._seq_addr, r._seq_word() + 2, 5.0)
            assert time.monotonic() - t0 < 4.0
            # Nothing published: a wait with a timeout times out (and costs no CPU).
            cpu0 = time.process_time()
            assert not r.wait_for_revision(2, 0.3)
            assert time.process_time() - cpu0 < 0.2
    finally:
        hp.stop(pub)


# -- derived state -------------------------------------------------------------------------------------


def test_derive_once_per_revision_with_many_threads(etcd_server, client, prefix, shm_name):
    for i in range(50):
        client.put(f"{prefix}/k{i:02d}", str(i))
    calls: list = []
    gate = threading.Event()

    def index(view):
        calls.append(view.revision)
        gate.wait(5)  # hold the computation so that every thread piles up behind it
        return {e.decoded: e.key for e in view}

    with Writer(shm_name, prefix, client=client, apply_delay=0.002) as w:
        w.start()
        r = Reader(shm_name)
        for round_ in range(3):
            results: list = []
            threads = [threading.Thread(target=lambda: results.append(r.derive(index))) for _ in range(16)]
            for t in threads:
                t.start()
            assert hp.wait_until(lambda: len(calls) == round_ + 1, 30)
            gate.set()
            for t in threads:
                t.join(30)
            gate.clear()
            rev = r.revision
            assert len(results) == 16 and {d.revision for d in results} == {rev}
            assert all(d.value is results[0].value for d in results)
            assert results[0].value[b"49"] == f"{prefix}/k49"
            assert calls == sorted(set(calls)) and len(calls) == round_ + 1
            assert r.derive(index).value is results[0].value  # cached: no new call
            new = int(client.put(f"{prefix}/k{round_:02d}", f"x{round_}").header.revision)
            assert r.wait_for_revision(new, 30)
        r.close()


# -- asyncio -------------------------------------------------------------------------------------------


def test_aio_wait_for_revision_and_watch(etcd_server, client, prefix, shm_name):
    import asyncio

    from shmkeyspace import aio

    client.put(f"{prefix}/a/k0", "0")
    with Writer(shm_name, prefix, client=client, apply_delay=0.002) as w:
        w.start()
        r = Reader(shm_name)

        async def main():
            loop = asyncio.get_running_loop()
            start = r.revision
            assert await aio.wait_for_revision(r, start, 1.0)  # already there
            assert not await aio.wait_for_revision(r, start + 1000, 0.2)  # times out cleanly
            # Fifty coroutines wait for the next revision; one put wakes them all.
            waiters = [asyncio.ensure_future(aio.wait_for_revision(r, start + 1, 30)) for _ in range(50)]
            await asyncio.sleep(0.05)
            assert not any(f.done() for f in waiters)
            rev = await loop.run_in_executor(
                None, lambda: int(client.put(f"{prefix}/a/k1", "1").header.revision)
            )
            assert await asyncio.gather(*waiters) == [True] * 50
            aio_threads = [t for t in threading.enumerate() if t.name == f"shmkeyspace-aio-{shm_name}"]
            assert len(aio_threads) == 1  # one thread for the name, not one per waiter
            # The async iterator: changes under prefix/a/, in order, with their revisions.
            got = []

            def churn():
                revs = []
                for i in range(6):
                    revs.append(int(client.put(f"{prefix}/{'ab'[i % 2]}/k{i}", str(i)).header.revision))
                    time.sleep(0.01)
                return revs

            task = loop.run_in_executor(None, churn)
            item_rev = 0
            async for item_rev_, keys in aio.watch(r, prefix=f"{prefix}/a/", since=rev, timeout=30.0):
                got.extend(keys)
                item_rev = item_rev_
                if f"{prefix}/a/k4" in keys:
                    break
            revs = await task
            assert got == [f"{prefix}/a/k0", f"{prefix}/a/k2", f"{prefix}/a/k4"]
            assert item_rev >= revs[4]
            # Behind the feed: a catchable error, like the sync watch.
            with pytest.raises(ChangesTooOldError):
                async for _ in aio.watch(r, since=start - 1, timeout=5.0):
                    pass

        asyncio.run(main())
        r.close()


def test_warm_start_from_the_state_file_is_a_load_for_the_feed(
    etcd_server, client, prefix, shm_name, tmp_path
):
    """A snapshot restored from disk has "everything" as its change set, like a load."""
    for i in range(5):
        client.put(f"{prefix}/k{i}", str(i))
    d = str(tmp_path / "state")
    with Writer(shm_name, prefix, client=client, apply_delay=0.002, state_dir=d) as w:
        w.start()
        r = Reader(shm_name)
        early = r.revision
        rev = int(client.put(f"{prefix}/k1", "x").header.revision)
        assert r.wait_for_revision(rev, 30)
        assert r.changes(early) == [f"{prefix}/k1"]
        w.persist_now()
    with Writer(shm_name, prefix, client=client, apply_delay=0.002, state_dir=d) as w2:
        w2.start()
        assert w2.restored is not None
        with pytest.raises(ChangesTooOldError):
            r.changes(early)  # before the restored snapshot: unknown
        base = r.revision
        rev = int(client.put(f"{prefix}/k2", "y").header.revision)
        assert r.wait_for_revision(rev, 30)
        assert list(r.changes(base)) == [f"{prefix}/k2"]
    r.close()


def test_polling_fallback_without_futex(shm_name, monkeypatch):
    """Where futexes are unavailable, waits poll the seq word and still see publications."""
    monkeypatch.setattr(futex, "AVAILABLE", False)
    pub = _spawn_publisher(shm_name, 1)
    try:
        with Reader(shm_name) as r:
            assert not r.wait_for_revision(2, 0.1)
            done = []
            t = threading.Thread(target=lambda: done.append(r.wait_for_revision(2, 60)))
            t.start()
            pub.stdin.write("2\n")
            pub.stdin.flush()
            t.join(60)
            assert done == [True]
    finally:
        hp.stop(pub)


def test_close_from_another_thread_ends_a_wait(shm_name):
    """A Reader closed while a thread sleeps in wait_for_revision: that thread gets
    ReaderClosedError (within its 1 s sleep slice), and futexes stay on for others."""
    from shmkeyspace.errors import ReaderClosedError

    available = futex.AVAILABLE
    pub = _spawn_publisher(shm_name, 1)
    try:
        r = Reader(shm_name)
        out: list = []

        def wait():
            try:
                out.append(r.wait_for_revision(99, None))
            except ReaderClosedError as exc:
                out.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.1)  # let it go to sleep (not an ordering assumption: either way it must end)
        r.close()
        t.join(30)
        assert not t.is_alive() and isinstance(out[0], ReaderClosedError)
        with Reader(shm_name) as r2:
            assert not r2.wait_for_revision(99, 0.05)
        assert futex.AVAILABLE == available
    finally:
        hp.stop(pub)
