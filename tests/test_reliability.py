"""Reliability under faults and bad input, with real processes, real etcd, real shm.

Faults: writers SIGKILLed at random points of publishing and replaced (readers
follow without restarting), etcd killed and restarted mid-stream and compacted
during an outage (the writer reloads), readers SIGSTOPped in the middle of a read
while the writer keeps publishing, long-lived readers through 10k publications
and several generations (no fd, memory or mapping growth), and a /dev/shm too
small for the next snapshot (SegmentFullError; the last snapshot stays).
Bad input: decoders that raise or return what msgpack cannot carry, non-UTF-8
keys, values near etcd's request limit, and (soak only) a prefix of 1M keys.

Every answer a reader gives is verified against the revision it claims (the
schedules in ``torture.py`` and below make contents a function of the revision),
and every test counts its faults and checked answers; CI runs small counts,
``SHMKEYSPACE_SOAK=1`` (or ``bench/scenarios/soak.py``) runs large ones and collects the
counts into a table (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import threading
import time

import helpers_procs as hp
import pytest
from helpers_procs import etcd_reachable

from shmkeyspace import Reader, Writer
from shmkeyspace.embedded import free_port
from shmkeyspace.errors import NotSerializableError
from shmkeyspace.etcd import connect
from shmkeyspace.key_values import prefix_end

SOAK_ONLY = pytest.mark.skipif(
    not hp.soak(), reason="soak only: set SHMKEYSPACE_SOAK=1 (or run bench/scenarios/soak.py)"
)


# -- child scripts ----------------------------------------------------------------------

#: Verifies every answer against torture.py's schedule and that revisions never go
#: back. argv: NAME BIG_KIB SEED PROGRESS. Prints a JSON result on SIGTERM.
SCHEDULE_READER = r"""
import json, random, signal, sys, time, torture, helpers_procs as hp
from shmkeyspace import Reader
from shmkeyspace.errors import SnapshotExpiredError
name, big, seed, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
rnd = random.Random(seed)
c = torture.Checker(big)
p = hp.ProgressFile(progress)
r = Reader(name, wait=30, cache_size=rnd.choice([0, 64]))
maxrev, errors, ops = 0, [], 0
def saw(rev):
    global maxrev
    if rev < maxrev:
        c.fail(f"revision went back from {maxrev} to {rev}")
    maxrev = max(maxrev, rev)
while not stop:
    ops += 1
    op = rnd.random()
    try:
        if op < 0.35:
            k = torture.k_key(rnd.randrange(torture.K)) if rnd.random() < 0.6 else torture.d_key(rnd.randrange(torture.D))
            c.entry(r.get(k), k)
        elif op < 0.6:
            got = r.range(b"/t/d", None)
            rev = got[-1].decoded if got and got[-1].key == "/t/meta" else None
            if rev is None:
                c.fail("range lost /t/meta"); continue
            saw(rev); c.entries(rev, got, b"/t/d", None)
        elif op < 0.75:
            got = r.prefixed(b"/t/")
            rev = next((e.decoded for e in got if e.key == "/t/meta"), None)
            if rev is None:
                c.fail("prefixed lost /t/meta"); continue
            saw(rev); c.entries(rev, got, b"/t/", b"/t0")
        else:
            try:
                with r.snapshot(copy=rnd.random() < 0.2) as s:
                    saw(s.revision)
                    meta = s.get("/t/meta")
                    if meta is None or meta.decoded != s.revision:
                        c.fail(f"snapshot at {s.revision}: meta {meta}"); continue
                    lo = torture.k_key(rnd.randrange(torture.K))
                    c.entries(s.revision, s.range(lo, b"/t/k999"), lo, b"/t/k999")
                    c.entries(s.revision, s.prefixed(b"/t/d"), b"/t/d", b"/t/e")
            except SnapshotExpiredError:
                c.expired += 1
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
        time.sleep(0.01)
    if ops % 16 == 0:
        p.update(maxrev=maxrev, checked=c.checked, bad=len(c.bad), errors=len(errors))
print(json.dumps({"checked": c.checked, "bad": c.bad, "errors": errors[:20], "n_errors": len(errors),
                  "maxrev": maxrev, "retries": r.retries, "expired": c.expired, "ops": ops}), flush=True)
"""

#: Publishes the "wide" schedule: N keys /w/%06d plus /w/meta. At revision R key i
#: holds [m, i] with m = max(1, R - (R - i) % 64) (so 1/64 of the keys change per
#: revision) and /w/meta holds R. argv: NAME N.
WIDE_PUBLISHER = r"""
import sys
from shmkeyspace import segment, publisher, writerlock
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.snapshot import pack_entry
name, n = sys.argv[1], int(sys.argv[2])
def m(r, i):
    return max(1, r - (r - i) % 64)
def entry(k, v, mod):
    return pack_entry(k, v, 1, mod, 1, 0)
pub = publisher.Publisher(name)
b = ImageBuilder()
items = [(b"/w/%06d" % i, entry(b"/w/%06d" % i, [m(1, i), i], m(1, i))) for i in range(n)]
items.append((b"/w/meta", entry(b"/w/meta", 1, 1)))
b.reset(items, 1)
parts, total = b.parts(); pub.publish(parts, total, 1, len(b))
r = 1
while True:
    r += 1
    ch = {b"/w/%06d" % i: entry(b"/w/%06d" % i, [r, i], r) for i in range(r % 64, n, 64)}
    ch[b"/w/meta"] = entry(b"/w/meta", r, r)
    b.apply(ch, r)
    parts, total = b.parts(); pub.publish(parts, total, r, len(b))
"""

#: Reads the whole wide schedule with range() over and over (long reads), checking
#: every entry; flags ``in_read`` around each range() call. argv: NAME N PROGRESS.
WIDE_READER = r"""
import json, signal, sys, helpers_procs as hp
from shmkeyspace import Reader
name, n, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
p = hp.ProgressFile(progress)
r = Reader(name, wait=30, cache_size=0)
checked, bad, maxrev = 0, [], 0
while not stop:
    p.update(in_read=1)
    got = r.range(b"/w/", b"/w0")
    p.update(in_read=0)
    rev = got[-1].decoded if got and got[-1].key == "/w/meta" else None
    ok = rev is not None and len(got) == n + 1 and rev >= maxrev
    if ok:
        for i, e in enumerate(got[:-1]):
            mod = max(1, rev - (rev - i) % 64)
            if e.key != "/w/%06d" % i or e.decoded != [mod, i] or e.mod_revision != mod:
                ok = False
                break
    if ok:
        checked += 1
        maxrev = rev
    elif len(bad) < 20:
        bad.append(f"range at {rev} (after {maxrev}): {len(got)} entries, first {got[:1]}"[:300])
    p.update(checked=checked, bad=len(bad), retries=r.retries, maxrev=maxrev)
print(json.dumps({"checked": checked, "bad": bad, "retries": r.retries, "maxrev": maxrev}), flush=True)
"""

#: Publishes torture.py's schedule exactly COUNT times, with a few huge spikes
#: (under /u/, outside the checked ranges) that force new generations, pausing
#: after each so readers really map it. After the first tenth it waits for the
#: file GO (the reader's warm-up is done). argv: NAME COUNT GO.
SPIKY_PUBLISHER = r"""
import os, sys, time, torture
from shmkeyspace import segment, publisher, writerlock
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.snapshot import pack_entry
name, count, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spikes = {count * 2 // 10: 1_500_000, count * 4 // 10: 4_000_000, count * 6 // 10: 9_000_000}
pub = publisher.Publisher(name)
b = ImageBuilder()
big = 4
for r in range(1, count + 1):
    if r == 1:
        b.reset([(k, pack_entry(k, v, m, m, 1, 0)) for k, (v, m) in sorted(torture.expected(1, big).items())], 1)
    else:
        ch = {k: None if x is None else pack_entry(k, x[0], x[1], x[1], 1, 0) for k, x in torture.changes(r, big).items()}
        if r in spikes:
            ch[b"/u/spike"] = pack_entry(b"/u/spike", b"s" * spikes[r], r, r, 1, 0)
        elif r - 1 in spikes:
            ch[b"/u/spike"] = None
        b.apply(ch, r)
    parts, total = b.parts()
    pub.publish(parts, total, r, len(b))
    if r == count // 10:
        while not os.path.exists(go):
            time.sleep(0.01)
    if r in spikes:
        time.sleep(0.3)
    elif r % 20 == 0:
        time.sleep(0.001)   # let readers run on 2 cores
print("gens", pub.gen, flush=True)
pub.close()
"""

#: A reader living through a whole SPIKY_PUBLISHER run: fd count, private RSS and
#: shm mappings after warm-up (then it creates GO) and at the end. argv: NAME COUNT GO.
LONG_READER = r"""
import ctypes, gc, json, random, sys, torture, helpers_procs as hp
from shmkeyspace import Reader
from shmkeyspace.errors import SnapshotExpiredError
name, count, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rnd = random.Random(7)
c = torture.Checker(4)
r = Reader(name, wait=30)
gens, ops, start = set(), 0, None
def work():
    global ops
    ops += 1
    op = rnd.random()
    if op < 0.4:
        k = torture.k_key(rnd.randrange(torture.K))
        c.entry(r.get(k), k)
    elif op < 0.7:
        got = r.prefixed(b"/t/")
        rev = next((e.decoded for e in got if e.key == "/t/meta"), None)
        if rev is None:
            c.fail("prefixed lost /t/meta")
        else:
            c.entries(rev, got, b"/t/", b"/t0")
    else:
        try:
            with r.snapshot(copy=rnd.random() < 0.3) as s:
                c.entries(s.revision, s.prefixed(b"/t/d"), b"/t/d", b"/t/e")
        except SnapshotExpiredError:
            c.expired += 1
    if ops % 10 == 0:
        gens.add(r.health().generation)
def settle():
    # Free memory glibc keeps after a big free (snapshot(copy=True) of a 9 MB spike
    # raises its dynamic mmap threshold, so later copies come from the heap and
    # stay cached): what remains is live memory, which is what a leak is.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
while r.revision < count // 10:       # warm-up: caches, lazy imports, allocator pools
    work()
settle()
start = {"fds": hp.fd_count(), "rss": hp.private_rss(), "maps": len(hp.shm_mappings()), "rev": r.revision}
open(go, "w").close()
while r.revision < count:
    work()
for _ in range(200):                  # a few more on the final publication
    work()
gens.add(r.health().generation)
settle()
end = {"fds": hp.fd_count(), "rss": hp.private_rss(), "maps": len(hp.shm_mappings()), "rev": r.revision}
print(json.dumps({"start": start, "end": end, "gens": sorted(gens), "checked": c.checked, "bad": c.bad,
                  "ops": ops, "retries": r.retries}), flush=True)
"""

#: Checks a snapshot of keys that are always written together (one transaction
#: sets every key to the same counter): any consistent snapshot has them all equal,
#: at one mod_revision equal to the snapshot's revision. argv: NAME PREFIX NKEYS PROGRESS.
TXN_READER = r"""
import json, signal, sys, time, helpers_procs as hp
from shmkeyspace import Reader
from shmkeyspace.errors import SnapshotExpiredError
name, prefix, nkeys, progress = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
p = hp.ProgressFile(progress)
r = Reader(name, wait=30)
checked, bad, maxrev, errors, n = 0, [], 0, [], 0
while not stop:
    n += 1
    try:
        with r.snapshot() as s:
            got = s.prefixed(prefix + "/")
            rev = s.revision
        vals = {e.decoded for e in got}
        mods = {e.mod_revision for e in got}
        if len(got) != nkeys or len(vals) != 1 or mods != {rev} or rev < maxrev:
            if len(bad) < 20:
                bad.append(f"rev {rev} (after {maxrev}): {len(got)} keys, values {sorted(map(str, vals))[:4]}, mods {sorted(mods)[:4]}")
        else:
            checked += 1
            maxrev = rev
        e = r.get(prefix + "/k%02d" % (n % nkeys))
        if e is None or e.mod_revision < 1:
            bad.append(f"get lost a key: {e}")
        else:
            checked += 1
    except SnapshotExpiredError:
        pass
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
        time.sleep(0.01)
    if n % 8 == 0:
        p.update(checked=checked, maxrev=maxrev, bad=len(bad))
    time.sleep(0.0005)
print(json.dumps({"checked": checked, "bad": bad, "errors": errors[:20], "maxrev": maxrev,
                  "retries": r.retries}), flush=True)
"""


def _finish(proc: subprocess.Popen, timeout: float = 30) -> dict:
    """SIGTERM a checking child and return its JSON result."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {err[-3000:]}"
    return hp.last_json(out)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout, or fail after ``timeout`` (with its stderr)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"child said nothing in {timeout}s; stderr: {proc.stderr.read()[-3000:]}")
    return box[0].strip()


# -- writer SIGKILL at random points, successors take over -----------------------------------------


def test_writer_sigkill_takeover_readers_follow(shm_name, tmp_path):
    """A publisher is SIGKILLed at random points of continuous publishing, again and
    again; each time a new one takes the name over (the kernel dropped the flock).
    Reader processes running throughout verify every answer against its revision,
    never see a revision go back, and follow each successor without restarting."""
    kills = hp.scaled(5, 60, "SHMKEYSPACE_SOAK_KILLS")
    big = 1200  # KiB: images cross the first 1 MiB buffer, so generations also grow mid-life
    rnd = random.Random()
    readers, writer, parent = [], None, None
    progress = [str(tmp_path / f"reader{i}.json") for i in range(2)]
    stats = {"kills": 0, "mid_first_publication": 0}
    try:
        writer = hp.spawn(hp.SCHEDULE_PUBLISHER, shm_name, str(big))
        parent = Reader(shm_name, wait=30, cache_size=0)
        readers = [
            hp.spawn(SCHEDULE_READER, shm_name, str(big), str(rnd.randrange(1 << 30)), progress[i])
            for i in range(2)
        ]
        assert hp.wait_until(lambda: all(hp.read_progress(p).get("maxrev", 0) > 0 for p in progress), 30)
        for k in range(kills + 1):
            # Every fourth life or so ends at once: during the successor's first
            # publication, which also creates its new generation.
            quick = 0 < k < kills and rnd.random() < 0.25
            if k > 0:
                before = parent.revision
                writer = hp.spawn(hp.SCHEDULE_PUBLISHER, shm_name, str(big))
                assert hp.wait_until(lambda: parent.health(stale_after=1e9).writer_pid == writer.pid, 30), (
                    writer.stderr.read() if writer.poll() is not None else "successor did not take over"
                )
                if not quick:
                    # It publishes, and the readers follow it without being restarted.
                    assert hp.wait_until(lambda: parent.revision > before + 3, 30)
                    target = parent.revision
                    assert hp.wait_until(
                        lambda: all(hp.read_progress(p).get("maxrev", 0) >= target for p in progress), 30
                    ), [hp.read_progress(p) for p in progress]
            if k == kills:
                break
            if quick:
                stats["mid_first_publication"] += 1
            else:
                time.sleep(rnd.uniform(0.0, 0.6))  # a random point of continuous publishing
            assert parent.health(stale_after=1e9).writer_alive
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(10)
            hp.stop(writer)
            stats["kills"] += 1
            h = parent.health()
            assert not h.writer_alive, h
            assert h.writer_pid == writer.pid  # the dead writer's pid stays, for diagnostics
            # The last complete publication is still served.
            assert parent.get("/t/meta").decoded == parent.revision
        # The final writer is live; only its generation (and the control segment) remain.
        assert hp.wait_until(lambda: len(hp.shm_files(shm_name)) == 2, 10), hp.shm_files(shm_name)
        results = [_finish(p) for p in readers]
        readers = []
    finally:
        for p in readers:
            hp.stop(p, signal.SIGKILL)
        hp.stop(writer, signal.SIGKILL)
        if parent is not None:
            parent.close()
    checked = sum(r["checked"] for r in results)
    bad = [b for r in results for b in r["bad"]]
    errors = [e for r in results for e in r["errors"]]
    hp.report_counts(
        "writer SIGKILL + takeover",
        faults=stats["kills"],
        answers=checked,
        inconsistencies=len(bad) + len(errors),
        killed_in_first_publication=stats["mid_first_publication"],
        reader_retries=sum(r["retries"] for r in results),
    )
    assert bad == [] and errors == [], (bad, errors)
    assert stats["kills"] == kills
    assert all(r["checked"] > 50 for r in results), results


def test_writer_process_sigkill_with_etcd(etcd_server, client, prefix, shm_name, tmp_path):
    """Real Writer processes (etcd -> shm) SIGKILLed while a feeder commits
    transactions; successors load and take over; a reader process checks every
    snapshot is one transaction's state. At the end the mirror equals etcd key by
    key at one revision, and a SIGTERMed writer exits cleanly leaving the snapshot."""
    kills = hp.scaled(2, 15, "SHMKEYSPACE_SOAK_WRITER_KILLS")
    nkeys = 8
    rnd = random.Random()
    tx = client.transactions
    state = {"n": 0, "stop": False, "errors": []}

    def commit():
        state["n"] += 1
        v = json.dumps(state["n"])
        client.transaction(
            compare=[], success=[tx.put(f"{prefix}/k{i:02d}", v) for i in range(nkeys)], failure=[]
        )

    def feed():
        while not state["stop"]:
            try:
                commit()
            except Exception as exc:  # pragma: no cover - surfaced below
                state["errors"].append(repr(exc))
            time.sleep(0.003)

    commit()
    progress = str(tmp_path / "txn.json")
    writer = reader = parent = None
    feeder = threading.Thread(target=feed, daemon=True)
    try:
        writer = hp.spawn(hp.WRITER, shm_name, prefix, etcd_server.endpoint, "json")
        assert _readline(writer, 60).startswith("ready")
        parent = Reader(shm_name, wait=10)
        reader = hp.spawn(TXN_READER, shm_name, prefix, str(nkeys), progress)
        assert hp.wait_until(lambda: hp.read_progress(progress).get("checked", 0) > 0, 30)
        feeder.start()
        for _ in range(kills):
            time.sleep(rnd.uniform(0.2, 1.0))
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(10)
            hp.stop(writer)
            assert not parent.health().writer_alive
            dead_at = parent.revision
            writer = hp.spawn(hp.WRITER, shm_name, prefix, etcd_server.endpoint, "json")
            assert _readline(writer, 60).startswith("ready")
            assert hp.wait_until(lambda: hp.read_progress(progress).get("maxrev", 0) > dead_at, 30)
        state["stop"] = True
        feeder.join(10)
        final = client.get(f"{prefix}/k00")[1].mod_revision  # every commit writes all keys
        assert parent.wait_for_revision(final, 30), (parent.revision, final)
        _assert_mirror_equals_etcd(parent, client, prefix, final)
        res = _finish(reader)
        reader = None
        assert parent.health().writer_alive
        # A clean stop: exit 0, the lock released, the snapshot left for readers.
        writer.send_signal(signal.SIGTERM)
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0 and "stopped" in out, err
        assert not parent.health().writer_alive
        assert parent.get(f"{prefix}/k00").decoded == state["n"] and len(hp.shm_files(shm_name)) == 2
    finally:
        state["stop"] = True
        hp.stop(reader, signal.SIGKILL)
        hp.stop(writer, signal.SIGKILL)
        if parent is not None:
            parent.close()
    hp.report_counts(
        "Writer process SIGKILL (etcd)",
        faults=kills,
        answers=res["checked"],
        inconsistencies=len(res["bad"]) + len(res["errors"]) + len(state["errors"]),
        transactions=state["n"],
    )
    assert res["bad"] == [] and res["errors"] == [] and state["errors"] == [], res
    assert res["checked"] > 20, res


def _assert_mirror_equals_etcd(reader: Reader, client, prefix: str, revision: int) -> int:
    """The snapshot at ``revision`` equals etcd's range at that revision, key by key."""
    with reader.snapshot(copy=True) as s:
        assert s.revision == revision, (s.revision, revision)
        mine = s.prefixed(prefix)
    p = prefix.encode()
    resp = client.get_range_response(p, prefix_end(p), revision=revision)
    theirs = [
        (bytes(kv.key), json.loads(kv.value), kv.create_revision, kv.mod_revision, kv.version)
        for kv in resp.kvs
    ]
    got = [
        (
            e.key.encode() if isinstance(e.key, str) else e.key,
            e.decoded,
            e.create_revision,
            e.mod_revision,
            e.version,
        )
        for e in mine
    ]
    assert got == theirs
    return len(got)


# -- etcd killed, restarted, compacted during an outage ----------------------------------------------


def test_etcd_kill_restart_and_compaction_during_outage(own_etcd, prefix, shm_name, caplog):
    caplog.set_level(logging.INFO, logger="shmkeyspace")
    rounds = hp.scaled(1, 5, "SHMKEYSPACE_SOAK_ETCD_ROUNDS")
    rnd = random.Random()
    feeder_client = connect(own_etcd.endpoint)
    state = {"n": 0, "rev": 0, "stop": False, "failed": 0}
    for i in range(20):
        feeder_client.put(f"{prefix}/k{i:02d}", json.dumps([0, i]))

    def feed():
        c = feeder_client
        while not state["stop"]:
            n = state["n"] + 1
            i = n % 20
            try:
                if n % 9 == 0:
                    c.delete(f"{prefix}/k{i:02d}")
                else:
                    c.put(f"{prefix}/k{i:02d}", json.dumps([n, i]))
                state["n"] = n
            except Exception:
                state["failed"] += 1
                time.sleep(0.1)
            time.sleep(0.002)

    w = Writer(
        shm_name,
        prefix,
        endpoints=own_etcd.endpoint,
        decoder=lambda kv: json.loads(kv.value),
        apply_delay=0.005,
    )
    checks = 0
    try:
        w.start()
        r = Reader(shm_name)
        for _ in range(rounds):
            # 1. etcd dies and comes back in the middle of a stream of updates.
            state["stop"] = False
            t = threading.Thread(target=feed, daemon=True)
            t.start()
            time.sleep(rnd.uniform(0.3, 1.0))
            own_etcd.kill()
            time.sleep(rnd.uniform(0.5, 1.5))
            own_etcd.start()
            time.sleep(rnd.uniform(0.3, 1.0))
            state["stop"] = True
            t.join(60)
            assert not t.is_alive(), "the feeder is stuck in a call"
            # The feeder's channel was cut by the kill; it reconnects in its own time.
            assert etcd_reachable(feeder_client, 60), "etcd restarted but never answered the test's client"
            rev = _newest_revision(feeder_client, prefix)
            assert r.wait_for_revision(rev, 60), (r.revision, rev)
            checks += _assert_mirror_equals_etcd(r, feeder_client, prefix, rev)

            # 2. While the writer is cut off, etcd moves on and compacts past it.
            reloads = _count(caplog, "was compacted")
            own_etcd.kill()
            port = own_etcd.client_port
            own_etcd.client_port = free_port()  # etcd up, but not where the writer looks
            own_etcd.start()
            other = connect(own_etcd.endpoint)
            for i in range(20):
                if i % 4 == 0:
                    other.delete(f"{prefix}/k{i:02d}")
                else:
                    other.put(f"{prefix}/k{i:02d}", json.dumps(["offline", i]))
            other.put(f"{prefix}/new-{rnd.randrange(1 << 30)}", json.dumps("created offline"))
            newest = _newest_revision(other, prefix)
            other.compact(newest)
            other.close()
            own_etcd.kill()
            own_etcd.client_port = port
            own_etcd.start()
            feeder_client.close()
            feeder_client = connect(own_etcd.endpoint)
            assert r.wait_for_revision(newest, 60), (r.revision, newest)
            checks += _assert_mirror_equals_etcd(r, feeder_client, prefix, newest)
            assert _count(caplog, "was compacted") > reloads, "the writer did not reload after compaction"
        assert w.publish_failures == 0
        r.close()
    finally:
        state["stop"] = True
        w.stop()
        feeder_client.close()
    hp.report_counts(
        "etcd kill/restart + compaction in outage",
        faults=3 * rounds,
        answers=checks,
        inconsistencies=0,
        publications=w.publications,
    )


def _newest_revision(client, prefix: str) -> int:
    """etcd's current revision (every write in these tests is under ``prefix``)."""
    p = prefix.encode()
    return client.get_range_response(p, prefix_end(p), limit=1).header.revision


def _count(caplog, text: str) -> int:
    return sum(text in rec.getMessage() for rec in caplog.records)


# -- a reader stopped in the middle of a read -------------------------------------------------------


def test_reader_sigstopped_mid_read_resumes_correctly(shm_name, tmp_path):
    stops = hp.scaled(2, 20, "SHMKEYSPACE_SOAK_STOPS")
    n = 20000
    rnd = random.Random()
    progress = str(tmp_path / "wide.json")
    writer = reader = None
    mid_read, retry_growth, advanced = 0, 0, []
    try:
        writer = hp.spawn(WIDE_PUBLISHER, shm_name, str(n))
        parent = Reader(shm_name, wait=30, cache_size=0)
        reader = hp.spawn(WIDE_READER, shm_name, str(n), progress)
        assert hp.wait_until(lambda: hp.read_progress(progress).get("checked", 0) >= 3, 60), hp.read_progress(
            progress
        )
        for _ in range(stops):
            # Stop it inside range(): try random moments until one lands mid-read.
            for _attempt in range(200):
                time.sleep(rnd.uniform(0, 0.02))
                os.kill(reader.pid, signal.SIGSTOP)
                assert hp.wait_until(lambda: hp.proc_state(reader.pid) == "T", 5)
                before = hp.read_progress(progress)
                if before.get("in_read"):
                    break
                os.kill(reader.pid, signal.SIGCONT)
            else:
                pytest.fail("could not stop the reader inside range()")
            mid_read += 1
            rev_a = parent.revision
            time.sleep(2.0)
            assert hp.proc_state(reader.pid) == "T"
            rev_b = parent.revision
            advanced.append(rev_b - rev_a)
            assert rev_b > rev_a + 2, "the writer must keep publishing while a reader is stopped"
            os.kill(reader.pid, signal.SIGCONT)
            assert hp.wait_until(
                lambda: hp.read_progress(progress).get("checked", 0) >= before["checked"] + 3, 60
            )
            after = hp.read_progress(progress)
            assert after["bad"] == 0, after
            assert after["maxrev"] > rev_b - 1  # it answers from publications made after the stop
            retry_growth += after["retries"] > before.get("retries", 0)
        res = _finish(reader)
        reader = None
        parent.close()
    finally:
        hp.stop(reader, signal.SIGKILL)
        hp.stop(writer, signal.SIGKILL)
    hp.report_counts(
        "reader SIGSTOP mid-read",
        faults=mid_read,
        answers=res["checked"],
        inconsistencies=len(res["bad"]),
        reader_retries=res["retries"],
        min_publications_during_stop=min(advanced),
    )
    assert res["bad"] == [], res
    # The interrupted read noticed the writer had moved on and was redone.
    assert retry_growth >= 1 and res["retries"] > 0, (retry_growth, res)


# -- long-lived readers do not leak ------------------------------------------------------------------


def test_reader_through_10k_publications_and_generations_does_not_leak(shm_name, tmp_path):
    count = hp.scaled(10_000, 100_000, "SHMKEYSPACE_SOAK_PUBLICATIONS")
    go = str(tmp_path / "go")
    writer = reader = None
    try:
        writer = hp.spawn(SPIKY_PUBLISHER, shm_name, str(count), go)
        reader = hp.spawn(LONG_READER, shm_name, str(count), go)
        out, err = reader.communicate(timeout=120 + count / 50)
        assert reader.returncode == 0, err
        wout, werr = writer.communicate(timeout=60)
        assert writer.returncode == 0, werr
    finally:
        hp.stop(reader, signal.SIGKILL)
        hp.stop(writer, signal.SIGKILL)
    res = hp.last_json(out)
    start, end = res["start"], res["end"]
    hp.report_counts(
        "reader through publications + generations",
        faults=len(res["gens"]) - 1,
        answers=res["checked"],
        inconsistencies=len(res["bad"]),
        publications=count,
        rss_growth_kib=(end["rss"] - start["rss"]) // 1024,
    )
    assert res["bad"] == [], res["bad"]
    assert len(res["gens"]) >= 4, res["gens"]  # >= 3 generation changes, all followed
    assert end["rev"] == count
    assert end["fds"] == start["fds"], res
    assert end["maps"] == start["maps"] == 2, res  # control + current generation: old ones unmapped
    assert end["rss"] - start["rss"] < 5 << 20, res  # private memory, not time
    assert res["checked"] > 1000, res


# -- /dev/shm too small -------------------------------------------------------------------------------

SHM_FULL_CHILD = r"""
import json, logging, os, sys, time
from shmkeyspace import Reader, Writer, segment, publisher, writerlock
from shmkeyspace.errors import SegmentFullError
from shmkeyspace.etcd import connect
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.snapshot import pack_entry
endpoint, prefix = sys.argv[1], sys.argv[2]
out = {"shm_bytes": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize}

# 1. The low-level Publisher: a snapshot bigger than the free space.
pub = publisher.Publisher("full1")
b = ImageBuilder()
b.reset([(b"/a", pack_entry(b"/a", "small", 1, 1, 1, 0))], 1)
parts, total = b.parts(); pub.publish(parts, total, 1, 1)
r = Reader("full1")
b.apply({b"/big": pack_entry(b"/big", b"x" * 3_000_000, 2, 2, 1, 0)}, 2)
parts, total = b.parts()
try:
    pub.publish(parts, total, 2, 2)
    out["publisher"] = "published?!"
except SegmentFullError as exc:
    out["publisher"] = str(exc)
    out["publisher_errno"] = exc.errno
out["after_full"] = [r.revision, r.get("/a").decoded, r.get("/big")]
out["files_after_full"] = sorted(os.listdir("/dev/shm"))
b.apply({b"/big": None}, 3)
parts, total = b.parts(); pub.publish(parts, total, 3, 1)
out["recovered"] = [r.revision, r.get("/a").decoded]
r.close(); pub.close(unlink=True)

# 2. A Writer: etcd sends a value whose snapshot does not fit.
class Grab(logging.Handler):
    msgs = []
    def emit(self, rec):
        self.msgs.append(rec.getMessage())
logging.getLogger("shmkeyspace").addHandler(Grab())
c = connect(endpoint)
c.put(prefix + "/a", "small")
w = Writer("full2", prefix, client=c, decoder=lambda kv: kv.value.decode(), apply_delay=0.005)
w.start()
r = Reader("full2")
rev0 = r.revision
big = c.put(prefix + "/big", b"y" * (1400 << 10)).header.revision
deadline = time.monotonic() + 30
while w.publish_failures == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
out["writer_failures"] = w.publish_failures
out["writer_after_full"] = [r.revision == rev0, r.get(prefix + "/a").decoded, r.get(prefix + "/big"),
                            r.health().writer_alive]
out["writer_logs"] = [m for m in Grab.msgs if "failed" in m]
# The next change retries, and fits once the big value is gone.
c.delete(prefix + "/big")
rev = c.put(prefix + "/b", "after").header.revision
out["writer_recovered"] = [r.wait_for_revision(rev, 30), r.get(prefix + "/big"), r.get(prefix + "/b").decoded]
w.stop(); r.close(); writerlock.unlink_all("full2")
print(json.dumps(out, default=str), flush=True)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"),
    reason="needs root and unshare(1) to mount a small private /dev/shm",
)
def test_shm_full_keeps_last_snapshot(etcd_server, prefix):
    """In a private mount namespace with a 1 MiB /dev/shm: a snapshot that does not
    fit raises SegmentFullError (no SIGBUS, nothing half-created), the writer counts
    and logs it, readers keep the last snapshot, and the next change recovers."""
    proc = hp.spawn(
        SHM_FULL_CHILD,
        etcd_server.endpoint,
        prefix,
        prefix=[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$0" "$@"',
        ],
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        hp.stop(proc, signal.SIGKILL)
    if proc.returncode != 0 and "mount" in err and "permission" in err.lower():
        pytest.skip(f"cannot mount a private tmpfs here: {err.strip()[:200]}")
    assert proc.returncode == 0, err[-3000:]
    res = hp.last_json(out)
    assert res["shm_bytes"] == 1 << 20, res
    assert "no room" in res["publisher"] and "last published snapshot stays" in res["publisher"], res
    assert res["publisher_errno"] == 28  # ENOSPC
    assert res["after_full"] == [1, "small", None], res
    # no half-made generation (the lock file is the writer lock, not a segment)
    assert res["files_after_full"] == [".shmks.full1.lock", "shmks.full1", "shmks.full1.1"], res
    assert res["recovered"] == [3, "small"], res
    assert res["writer_failures"] >= 1, res
    assert res["writer_after_full"] == [True, "small", None, True], res
    assert any("no room" in m for m in res["writer_logs"]), res["writer_logs"]
    assert res["writer_recovered"] == [True, None, "after"], res
    hp.report_counts("/dev/shm full", faults=2, answers=8, inconsistencies=0)


# -- bad input -----------------------------------------------------------------------------------------


def _bad_decoder(kv):
    v = kv.value
    if v == b"raise":
        raise ValueError("this decoder refuses 'raise'")
    if v == b"set":
        return {1, 2, 3}
    if v == b"object":
        return object()
    if v == b"intkeys":
        return {1: "int keys readers cannot unpack"}
    return v.decode()


def test_decoder_errors_and_unserializable_values(client, prefix, shm_name, caplog):
    caplog.set_level(logging.WARNING, logger="shmkeyspace")
    for k, v in [
        ("good1", "one"),
        ("raise", "raise"),
        ("set", "set"),
        ("object", "object"),
        ("intkeys", "intkeys"),
        ("good2", "two"),
    ]:
        client.put(f"{prefix}/{k}", v)
    with Writer(shm_name, prefix, client=client, decoder=_bad_decoder, apply_delay=0.005) as w:
        w.start()
        with Reader(shm_name) as r:
            assert [e.key for e in r.prefixed(prefix + "/")] == [f"{prefix}/good1", f"{prefix}/good2"]
            assert r.get(f"{prefix}/good1").decoded == "one" and len(r) == 2
            for k in ("raise", "set", "object", "intkeys"):
                assert r.get(f"{prefix}/{k}") is None
            msgs = [rec.getMessage() for rec in caplog.records]
            assert any("this decoder refuses 'raise'" in m for m in msgs), msgs
            for k in ("set", "object", "intkeys"):
                hits = [
                    m
                    for m in msgs
                    if f"{prefix}/{k}" in m
                    and "cannot be stored in shared memory" in m
                    and "msgpack-serializable" in m
                ]
                assert hits, (k, msgs)
            # Recoverable: a later good value brings the key in; a bad one takes it out.
            rev = client.put(f"{prefix}/set", "now fine").header.revision
            client.put(f"{prefix}/good1", "object")
            rev = client.put(f"{prefix}/good2", "set").header.revision
            assert r.wait_for_revision(rev, 10)
            assert r.get(f"{prefix}/set").decoded == "now fine"
            assert r.get(f"{prefix}/good1") is None and r.get(f"{prefix}/good2") is None
            assert [e.key for e in r.prefixed(prefix + "/")] == [f"{prefix}/set"]
        assert w.publish_failures == 0
    # The error type the writer uses, for callers packing by hand.
    from shmkeyspace.snapshot import pack_entry

    with pytest.raises(NotSerializableError, match="cannot be stored in shared memory"):
        pack_entry(b"/k", {1, 2}, 1, 1, 1, 0)


def test_non_utf8_keys(client, prefix, shm_name):
    p = prefix.encode()
    keys = [p + b"/a", p + b"/z", p + "/é".encode(), p + b"/\xff\xfe", p + b"/\xff\xfe\x00x", p + b"/\x80"]
    for i, k in enumerate(keys):
        client.put(k, b"v%d" % i)
    with Writer(shm_name, prefix, client=client, apply_delay=0.005) as w:
        w.start()
        with Reader(shm_name) as r:
            e = r.get(p + b"/\xff\xfe")
            assert e is not None and e.key == p + b"/\xff\xfe" and isinstance(e.key, bytes)
            assert e.decoded == b"v3"
            assert r.get(p + b"/\x80").key == p + b"/\x80"
            assert r.get(prefix + "/é").key == prefix + "/é"  # valid UTF-8 comes back as str
            assert r.get(p + b"/\xff") is None
            # Ranges are in byte order, whatever the key's type.
            raw = lambda es: [x.key.encode() if isinstance(x.key, str) else x.key for x in es]  # noqa: E731
            assert raw(r.prefixed(prefix)) == sorted(keys)
            assert raw(r.range(p + b"/\x80", None)) == sorted(k for k in keys if k >= p + b"/\x80")
            assert raw(r.prefixed(p + b"/\xff")) == [p + b"/\xff\xfe", p + b"/\xff\xfe\x00x"]
            assert raw(r.range(p + b"/b", p + b"/\xff")) == [p + b"/z", p + b"/\x80", p + "/é".encode()]
            with r.snapshot() as s:
                assert s.get(p + b"/\xff\xfe\x00x").decoded == b"v4"


def test_value_near_etcd_request_limit(client, prefix, shm_name):
    value = os.urandom(1400 << 10)  # 1.4 MiB; etcd refuses requests over 1.5 MiB by default
    rev = client.put(f"{prefix}/big", value).header.revision
    client.put(f"{prefix}/small", b"s")
    with Writer(shm_name, prefix, client=client, apply_delay=0.005) as w:
        w.start()
        with Reader(shm_name) as r:
            e = r.get(f"{prefix}/big")
            assert e.decoded == value and e.mod_revision == rev
            assert [x.decoded for x in r.prefixed(prefix)] == [value, b"s"]
            value2 = os.urandom(1450 << 10)
            rev2 = client.put(f"{prefix}/big", value2).header.revision
            assert r.wait_for_revision(rev2, 10)
            assert r.get(f"{prefix}/big").decoded == value2


@SOAK_ONLY
def test_prefix_of_a_million_keys(prefix, shm_name):
    """1M keys: paginated load + first publication, then reads (soak only)."""
    from shmkeyspace.embedded import EtcdServer

    n = hp.scaled(1_000_000, 1_000_000, "SHMKEYSPACE_SOAK_KEYS")
    args = [
        "--max-txn-ops",
        "2048",
        "--max-request-bytes",
        str(8 << 20),
        "--quota-backend-bytes",
        str(8 << 30),
    ]
    with EtcdServer(extra_args=args) as srv:
        c = connect(srv.endpoint)
        tx = c.transactions
        t0 = time.monotonic()
        for s in range(0, n, 2000):
            c.transaction(
                compare=[],
                success=[
                    tx.put(f"{prefix}/{i:08d}", json.dumps({"i": i, "v": "x" * 40}))
                    for i in range(s, min(n, s + 2000))
                ],
                failure=[],
            )
        seed_s = time.monotonic() - t0
        w = Writer(shm_name, prefix, client=c, decoder=lambda kv: json.loads(kv.value))
        try:
            t0 = time.monotonic()
            w.start()
            load_publish_s = time.monotonic() - t0
            with Reader(shm_name) as r:
                assert len(r) == n
                rnd = random.Random(1)
                for i in rnd.sample(range(n), 1000):
                    assert r.get(f"{prefix}/{i:08d}").decoded["i"] == i
                got = r.range(f"{prefix}/{n // 2:08d}", f"{prefix}/{n // 2 + 5000:08d}")
                assert [e.decoded["i"] for e in got] == list(range(n // 2, n // 2 + 5000))
                h = r.health()
            rev = c.put(f"{prefix}/{0:08d}", json.dumps({"i": 0, "v": "changed"})).header.revision
            with Reader(shm_name) as r:
                assert r.wait_for_revision(rev, 60)
                assert r.get(f"{prefix}/{0:08d}").decoded["v"] == "changed"
            incremental_s = w.last_publish_seconds
        finally:
            w.stop()
            c.close()
    hp.report_counts(
        "prefix of 1M keys",
        faults=0,
        answers=1002,
        inconsistencies=0,
        keys=n,
        seed_seconds=round(seed_s, 1),
        load_publish_seconds=round(load_publish_s, 2),
        image_mib=round(h.bytes / 2**20, 1),
        incremental_publish_ms=round(incremental_s * 1e3, 1),
    )
