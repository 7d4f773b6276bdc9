"""KeySpace against a real etcd: Gazette's semantics, outages, compaction, pagination.

Every test talks to a real etcd (the session server, or a private one for tests
that kill, restart or compact it). The mirror is always checked key by key —
value, create/mod revision, version and lease — against etcd's own Range at the
mirror's revision, so "converged" means "equal to etcd at the revision it claims".
"""

from __future__ import annotations

import logging
import random
import threading
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest
from helpers_procs import etcd_reachable

from shmkeyspace import decoders
from shmkeyspace.embedded import EtcdServer
from shmkeyspace.etcd import connect
from shmkeyspace.key_values import prefix_end
from shmkeyspace.keyspace import FIRST_PAGE, KeySpace, KeySpaceError

KS_LOG = "shmkeyspace.keyspace"


# -- helpers ----------------------------------------------------------------------


def rows(kvs) -> List[tuple]:
    return [
        (
            bytes(kv.key),
            bytes(kv.value),
            int(kv.create_revision),
            int(kv.mod_revision),
            int(kv.version),
            int(kv.lease),
        )
        for kv in kvs
    ]


def etcd_rows(client, root_key: bytes, revision: Optional[int] = None) -> List[tuple]:
    kw = {"revision": revision} if revision else {}
    return rows(client.get_range_response(root_key, prefix_end(root_key), **kw).kvs)


def etcd_revision(client) -> int:
    return int(client.get_range_response(b"\0probe", b"\0probf").header.revision)


def utf8_ok(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def assert_mirror_equals_etcd(ks: KeySpace, client, decodable=lambda v: True) -> int:
    """The mirror equals etcd's Range at the mirror's revision, key by key."""
    with ks.lock:
        rev = ks.header.revision
        mine = rows(ks.key_values)
        for kv in ks.key_values:
            assert kv.decoded == ks.decoder(kv), kv.key
    theirs = [r for r in etcd_rows(client, ks.root_key, rev) if decodable(r[1])]
    if mine != theirs:
        a, b = {r[0]: r for r in mine}, {r[0]: r for r in theirs}
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        pytest.fail(f"mirror at revision {rev} differs from etcd: {diff}")
    return rev


def wait_until(pred, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def txn_revision(resps) -> int:
    return max(int(getattr(r, r.WhichOneof("response")).header.revision) for r in resps)


@pytest.fixture
def stopper():
    """Collects WatchThreads / clients and stops them however the test ends."""
    things = []
    yield things
    for t in reversed(things):
        try:
            t.stop() if hasattr(t, "stop") else t.close()
        except Exception:
            pass


# -- randomized model test ------------------------------------------------------------


class Model:
    """What etcd must hold: key -> (value, create_revision, mod_revision, version, lease)."""

    def __init__(self) -> None:
        self.kv: Dict[bytes, tuple] = {}

    def put(self, key: bytes, value: bytes, rev: int, lease: int) -> None:
        old = self.kv.get(key)
        create, version = (old[1], old[3] + 1) if old else (rev, 1)
        self.kv[key] = (value, create, rev, version, lease)

    def rows_under(self, root: bytes) -> List[tuple]:
        return [(k, *v) for k, v in sorted(self.kv.items()) if k.startswith(root) and utf8_ok(v[0])]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_model(client, prefix, seed, stopper):
    rng = random.Random(seed)
    root = f"{prefix}/ks"
    rk = root.encode()
    inside = [
        rk,
        rk + b"/a",
        rk + b"/b",
        rk + b"/c/d",
        rk + b"x",
        rk + b"\xff",
        rk + b"/\x00",
        rk + b"/e\xff\xfe",
        rk + b"/f",
    ]
    # Keys sharing root's string without being under it, on both sides of its range.
    outside = [
        rk[:-1],
        rk[:-1] + b"r/z",
        prefix_end(rk),
        prefix_end(rk) + b"/a",
        rk[:-1] + b"\xff",
        f"{prefix}/j".encode(),
    ]
    for k in outside:
        assert not k.startswith(rk)
    assert len(set(inside + outside)) == len(inside + outside)
    every = inside + outside
    model = Model()
    lease = client.lease(600)

    def value() -> bytes:
        if rng.random() < 0.1:
            return b"\xff\xfebad-utf8-%d" % rng.randrange(1000)  # the decoder rejects these
        return ("v%d" % rng.randrange(10**6)).encode()

    def put(key: bytes) -> int:
        lid = lease.id if rng.random() < 0.2 else 0
        v = value()
        rev = int(client.put(key, v, lease=lid or None).header.revision)
        model.put(key, v, rev, lid)
        return rev

    # Some state before the load, including an undecodable key under root.
    for k in inside[:4] + outside[:3]:
        put(k)
    rev = int(client.put(rk + b"/pre-bad", b"\xff\xff").header.revision)
    model.put(rk + b"/pre-bad", b"\xff\xff", rev, 0)

    ks = KeySpace(root, decoders.utf8)
    ks.load(client)
    expected = ks.header.revision
    assert expected == etcd_revision(client)
    assert rows(ks.key_values) == model.rows_under(rk)
    stopper.append(ks.start_watch(client))

    for batch in range(6):
        for _ in range(30):
            r = rng.random()
            if r < 0.35:
                k = rng.choice(inside if rng.random() < 0.7 else outside)
                rev = put(k)
                if k.startswith(rk):
                    expected = rev
            elif r < 0.55:
                k = rng.choice(every)
                resp = client.delete(k, return_response=True)
                assert (resp.deleted > 0) == (k in model.kv), k
                if resp.deleted:
                    del model.kv[k]
                    if k.startswith(rk):
                        expected = int(resp.header.revision)
            elif r < 0.93:
                keys = rng.sample(every, rng.randint(2, 6))
                ops, plan = [], []
                for k in keys:
                    if rng.random() < 0.65:
                        v = value()
                        ops.append(client.transactions.put(k, v))
                        plan.append((k, v))
                    else:
                        ops.append(client.transactions.delete(k))
                        plan.append((k, None))
                ok, resps = client.transaction(compare=[], success=ops, failure=[])
                assert ok
                rev = txn_revision(resps)
                touched_root = False
                for k, v in plan:
                    if v is not None:
                        model.put(k, v, rev, 0)
                    elif k in model.kv:
                        del model.kv[k]
                    else:
                        continue
                    touched_root |= k.startswith(rk)
                if touched_root:
                    expected = rev
            else:
                # Revoking the lease deletes its keys in one revision.
                doomed = [k for k, v in model.kv.items() if v[4] == lease.id]
                client.revoke_lease(lease.id)
                if doomed:
                    rev = etcd_revision(client)
                    for k in doomed:
                        del model.kv[k]
                    if any(k.startswith(rk) for k in doomed):
                        expected = rev
                lease = client.lease(600)
        assert ks.wait_for_revision(expected, 10), (batch, ks.header.revision, expected)
        # The mirror neither ran ahead nor kept anything the model does not hold.
        assert ks.header.revision == expected
        with ks.lock:
            assert rows(ks.key_values) == model.rows_under(rk), f"batch {batch}"
        assert_mirror_equals_etcd(ks, client, utf8_ok)
        assert etcd_rows(client, rk) == [(k, *v) for k, v in sorted(model.kv.items()) if k.startswith(rk)]

    # A fresh load at the watched mirror's revision agrees with it exactly.
    fresh = KeySpace(root, decoders.utf8)
    fresh.load(client, rev=ks.header.revision)
    assert fresh.header.revision == ks.header.revision
    assert fresh.key_values == ks.key_values
    client.revoke_lease(lease.id)


# -- revision semantics -----------------------------------------------------------------


def test_revision_ignores_outside_writes_and_progress(prefix, stopper):
    with EtcdServer(extra_args=["--experimental-watch-progress-notify-interval=200ms"]) as srv:
        c = connect(srv.endpoint)
        stopper.append(c)
        root = f"{prefix}/r"
        c.put(root + "/a", "1")
        ks = KeySpace(root, decoders.utf8)
        ks.load(c)
        calls = []
        ks.observers.append(lambda: calls.append((ks.header.revision, ks.changed_keys)))
        wt = ks.start_watch(c)
        stopper.append(wt)
        r1 = int(c.put(root + "/b", "2").header.revision)
        assert ks.wait_for_revision(r1, 10)
        assert ks.header.revision == r1 and calls[-1] == (r1, {(root + "/b").encode()})
        n_calls = len(calls)

        # A raw watch of the parent prefix captures real responses for the outside writes.
        import queue

        raw_q: "queue.Queue" = queue.Queue()
        wid = c.add_watch_prefix_callback(prefix, raw_q.put, start_revision=r1 + 1, progress_notify=True)
        outside = [
            prefix,
            f"{prefix}/q",
            f"{prefix}/q/x",
            prefix_end(root.encode()).decode() + "/x",
            prefix_end(root.encode()).decode(),
        ]
        for k in outside:
            r2 = int(c.put(k, "o").header.revision)
        # etcd tells the mirror about r2 only through progress notifications.
        assert wait_until(lambda: ks.etcd_revision >= r2, 10), (ks.etcd_revision, r2)
        assert ks.header.revision == r1
        assert len(calls) == n_calls  # no update for a progress notification
        assert_mirror_equals_etcd(ks, c)

        # The same through apply(): real responses with outside events, and a real
        # progress notification (a response without events).
        outside_events = []
        while len(outside_events) < len(outside):
            resp = raw_q.get(timeout=10)
            outside_events.extend(resp.events)
            ks.apply(resp)  # events outside root: logged and skipped
        progress = None
        while progress is None:
            resp = raw_q.get(timeout=10)
            if not resp.events:
                progress = resp
        assert int(progress.header.revision) >= r2
        ks.apply(progress)
        assert ks.header.revision == r1 and len(calls) == n_calls
        c.cancel_watch(wid)

        # A delete raises the revision to the delete's revision; a delete of a
        # missing key writes nothing and changes nothing.
        d = c.delete(root + "/a", return_response=True)
        r3 = int(d.header.revision)
        assert d.deleted == 1 and r3 > r2
        assert ks.wait_for_revision(r3, 10)
        assert ks.header.revision == r3 and calls[-1] == (r3, {(root + "/a").encode()})
        assert not c.delete(root + "/missing", return_response=True).deleted
        assert_mirror_equals_etcd(ks, c)
        wt.stop()  # before this etcd goes away


def test_two_mirrors_equal_revision_iff_equal_contents(client, prefix, stopper):
    root = f"{prefix}/m"
    for i in range(10):
        R = int(client.put(f"{root}/k{i}", f"v{i}").header.revision)
    # Changes after R, which both mirrors must pick up from their watches.
    for i in range(10, 14):
        client.put(f"{root}/k{i}", f"v{i}")
    client.delete(f"{root}/k0")
    client.put(f"{prefix}/n", "outside")

    a, b = KeySpace(root, decoders.utf8), KeySpace(root, decoders.utf8)
    a.load(client, rev=R)
    b.load(client, rev=R)

    def check(expect_equal: bool) -> None:
        with a.lock, b.lock:
            same_rev = a.header.revision == b.header.revision
            same_kvs = a.key_values == b.key_values
        assert same_rev == same_kvs == expect_equal, (a.header.revision, b.header.revision)

    # A load at R is exact at R (etcd's header says the current revision).
    assert a.header.revision == b.header.revision == R
    assert rows(a.key_values) == etcd_rows(client, a.root_key, R)
    check(True)

    wa, wb = a.start_watch(client), b.start_watch(client)
    stopper.extend([wa, wb])
    last = int(client.put(f"{root}/k14", "v14").header.revision)
    assert a.wait_for_revision(last, 10) and b.wait_for_revision(last, 10)
    check(True)
    assert_mirror_equals_etcd(a, client)

    wb.stop()
    assert not wb.is_alive()
    r = int(client.put(f"{root}/k1", "changed").header.revision)
    assert a.wait_for_revision(r, 10)
    check(False)  # b is behind: different revision, different contents
    client.put(f"{prefix}/n", "outside again")
    time.sleep(0.1)
    check(False)
    r = int(client.delete(f"{root}/k2", return_response=True).header.revision)
    assert a.wait_for_revision(r, 10)
    check(False)

    wb = b.start_watch(client)
    stopper.append(wb)
    assert b.wait_for_revision(r, 10)
    check(True)
    assert_mirror_equals_etcd(b, client)

    # Both up to date through an outside write: still equal.
    client.put(f"{prefix}/n", "outside, third")
    r = int(client.put(f"{root}/k3", "x").header.revision)
    assert a.wait_for_revision(r, 10) and b.wait_for_revision(r, 10)
    check(True)

    # The converse has a limit, by design: a key put and deleted while b is behind
    # leaves equal contents, yet a's revision moved (a delete raises the revision).
    wb.stop()
    client.put(f"{root}/tmp", "t")
    r = int(client.delete(f"{root}/tmp", return_response=True).header.revision)
    assert a.wait_for_revision(r, 10)
    with a.lock, b.lock:
        assert a.key_values == b.key_values and a.header.revision == r > b.header.revision


# -- decoding -------------------------------------------------------------------------


def test_decode_failure_excludes_logs_and_recovers(client, prefix, stopper, caplog):
    caplog.set_level(logging.WARNING, logger=KS_LOG)
    root = f"{prefix}/d"
    client.put(f"{root}/good", '{"a": 1}')
    client.put(f"{root}/bad", "not json")
    ks = KeySpace(root, decoders.json)
    ks.load(client)
    assert [kv.key for kv in ks.key_values] == [f"{root}/good".encode()]
    assert any(f"{root}/bad" in r.getMessage() for r in caplog.records)
    stopper.append(ks.start_watch(client))

    # A later valid value brings the key back.
    r = int(client.put(f"{root}/bad", '{"ok": true}').header.revision)
    assert ks.wait_for_revision(r, 10)
    assert ks.key_values.get(f"{root}/bad").decoded == {"ok": True}

    # A failed decode of a present key removes it (and is logged).
    caplog.clear()
    r = int(client.put(f"{root}/good", "{broken").header.revision)
    assert ks.wait_for_revision(r, 10)
    assert ks.key_values.get(f"{root}/good") is None
    assert any(f"{root}/good" in r_.getMessage() and r_.levelno >= logging.WARNING for r_ in caplog.records)
    assert_mirror_equals_etcd(ks, client, lambda v: v.startswith(b'{"'))

    # An excluded new key still moves the revision (the mirror is exact there),
    # and its delete is consistent (no "unknown key" error).
    caplog.clear()
    r = int(client.put(f"{root}/new", "x{").header.revision)
    assert ks.wait_for_revision(r, 10) and ks.header.revision == r
    assert ks.key_values.get(f"{root}/new") is None
    r = int(client.delete(f"{root}/new", return_response=True).header.revision)
    assert ks.wait_for_revision(r, 10) and ks.header.revision == r
    assert not any("unknown key" in r_.getMessage() for r_ in caplog.records)

    r = int(client.put(f"{root}/good", '{"b": 2}').header.revision)
    assert ks.wait_for_revision(r, 10)
    assert ks.key_values.get(f"{root}/good").decoded == {"b": 2}
    assert_mirror_equals_etcd(ks, client)


# -- batching -------------------------------------------------------------------------


def test_burst_within_apply_delay_is_one_update(client, prefix, stopper):
    root = f"{prefix}/b"
    ks = KeySpace(root, decoders.utf8)
    ks.watch_apply_delay = 1.0
    ks.load(client)
    calls = []
    ks.observers.append(lambda: calls.append(set(ks.changed_keys or ())))
    stopper.append(ks.start_watch(client))
    time.sleep(0.2)  # the watch is registered (from load revision + 1 anyway)

    keys = [f"{root}/k{i}".encode() for i in range(15)]
    t0 = time.monotonic()
    revs = [int(client.put(k, "v").header.revision) for k in keys]  # 15 separate revisions
    burst = time.monotonic() - t0
    assert ks.wait_for_revision(revs[-1], 15)
    if burst > 0.8 * ks.watch_apply_delay:
        pytest.skip(f"the burst took {burst:.2f}s, longer than the apply delay: cannot test batching")
    touched = [c for c in calls if c & set(keys)]
    assert len(touched) == 1, touched
    assert touched[0] == set(keys)

    # A transaction of many puts is one response, hence one update too.
    calls.clear()
    ok, resps = client.transaction(
        compare=[], success=[client.transactions.put(k, "w") for k in keys], failure=[]
    )
    assert ks.wait_for_revision(txn_revision(resps), 15)
    assert calls == [set(keys)]


# -- compaction -----------------------------------------------------------------------


def test_compaction_while_behind_reloads(own_etcd, prefix, stopper, caplog):
    caplog.set_level(logging.WARNING, logger=KS_LOG)
    c = connect(own_etcd.endpoint)
    stopper.append(c)
    root = f"{prefix}/c"
    for i in range(20):
        c.put(f"{root}/k{i:02d}", f"v{i}")
    ks = KeySpace(root, decoders.utf8)
    ks.load(c)
    calls = []
    ks.observers.append(lambda: calls.append(ks.changed_keys))
    wt = ks.start_watch(c)
    r = int(c.put(f"{root}/k00", "w").header.revision)
    assert ks.wait_for_revision(r, 10)

    wt.stop()
    assert not wt.is_alive()
    behind = ks.header.revision
    for i in range(20, 30):
        c.put(f"{root}/k{i:02d}", f"v{i}")
    for i in range(1, 4):
        c.delete(f"{root}/k{i:02d}")
    c.put(f"{prefix}/outside", "o")
    last_root = int(c.put(f"{root}/k05", "late").header.revision)
    newest = int(c.put(f"{prefix}/outside", "o2").header.revision)
    c.compact(newest)
    assert ks.header.revision == behind  # nothing moved while stopped

    calls.clear()
    wt = ks.start_watch(c)
    stopper.append(wt)
    assert ks.wait_for_revision(last_root, 15)
    time.sleep(0.3)  # let anything extra show up
    assert calls == [None]  # one update, a whole reload
    assert ks.header.revision == newest  # a reload is exact at the current revision
    assert_mirror_equals_etcd(ks, c)
    assert any("compacted" in r_.getMessage() for r_ in caplog.records)

    # And the watch carries on normally after the reload.
    r = int(c.put(f"{root}/k06", "after").header.revision)
    assert ks.wait_for_revision(r, 10)
    assert calls[-1] == {f"{root}/k06".encode()}
    assert_mirror_equals_etcd(ks, c)


# -- etcd outage ------------------------------------------------------------------------


STOP_BOUND = 60.0


def test_etcd_killed_and_restarted_mid_stream(own_etcd, prefix, stopper):
    root = f"{prefix}/o"
    wc = connect(own_etcd.endpoint, timeout=2)  # the writer's own client
    c = connect(own_etcd.endpoint)  # the mirror's
    # A second mirror, to stop during the outage. Its client's timeout is long, so a
    # stop() that waited on the dead etcd could not finish within the join below.
    c2 = connect(own_etcd.endpoint, timeout=STOP_BOUND)
    stopper.extend([wc, c, c2])
    for i in range(30):
        wc.put(f"{root}/k{i:02d}", "init")
    ks = KeySpace(root, decoders.utf8)
    ks.load(c)
    stopper.append(ks.start_watch(c))
    ks2 = KeySpace(root, decoders.utf8)
    ks2.load(c2)
    w2 = ks2.start_watch(c2)
    stopper.append(w2)

    final: Dict[str, Optional[str]] = {}
    acked = [0]
    failures = [0]
    stop = threading.Event()
    # The writer issues ops only while `go` is set; `paused` says it is waiting at
    # that gate with nothing in flight. Killing etcd while the writer is paused
    # makes "acknowledged before the kill" exact: a put in flight at the kill could
    # otherwise be acknowledged after the count is read.
    go, paused = threading.Event(), threading.Event()
    go.set()

    def writer() -> None:
        rng = random.Random(7)
        i = 0
        while not stop.is_set():
            if not go.is_set():
                paused.set()
                while not go.wait(0.05):
                    if stop.is_set():
                        return
                paused.clear()
            key = f"{root}/k{rng.randrange(40):02d}"
            val = None if rng.random() < 0.15 else f"v{i}"
            while not stop.is_set():  # retry one op until acknowledged
                try:
                    wc.delete(key) if val is None else wc.put(key, val)
                    break
                except Exception:
                    failures[0] += 1
                    time.sleep(0.05)
            else:
                return
            final[key] = val
            acked[0] += 1
            i += 1
            time.sleep(0.002)

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        assert wait_until(lambda: acked[0] >= 100, 60)
        go.clear()
        assert paused.wait(60), "the writer never reached its gate"
        # Nothing in flight: the mirror catches up with everything etcd acknowledged.
        assert ks.wait_for_revision(etcd_revision(c), 60)
        own_etcd.kill()  # returns once the process is gone
        killed_at = acked[0]
        with ks.lock:
            held_rev, held = ks.header.revision, list(ks.key_values)
        assert held_rev > 0 and len(held) > 0
        go.set()  # the writer's ops now meet a dead etcd (and retry)
        assert wait_until(lambda: failures[0] > 0, 60), "the writer never hit the outage"

        # stop() of a watch really stops it while etcd is down, without waiting on etcd:
        # anything that waited on c2 would still be blocked when the join gives up.
        w2.stop(timeout=STOP_BOUND / 2)
        assert not w2.is_alive()

        time.sleep(1.0)  # an outage long enough for a lost or invented event to show
        with ks.lock:  # the mirror is kept, unchanged, during the outage
            assert ks.header.revision == held_rev and list(ks.key_values) == held
        assert acked[0] == killed_at  # nothing was acknowledged by a dead etcd

        own_etcd.start()
        assert wait_until(lambda: acked[0] >= killed_at + 100, 60), (acked[0], failures[0])
    finally:
        stop.set()
        th.join(10)
    assert not th.is_alive()
    assert etcd_reachable(c, 60), "the mirror's client never reconnected"
    last = etcd_revision(c)  # every write is under root in this etcd
    assert ks.wait_for_revision(last, 30), (ks.header.revision, last)
    assert ks.header.revision == last
    assert_mirror_equals_etcd(ks, c)
    # Every acknowledged write is reflected: no event lost across the outage.
    with ks.lock:
        mirror = {kv.key.decode(): kv.value.decode() for kv in ks.key_values}
    for key, val in final.items():
        assert mirror.get(key) == val, key
    assert failures[0] > 0  # the writer really hit the outage


# -- root validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "root, clean",
    [("/a//", "/a"), ("a//b", "a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/a/b/./", "/a/b")],
)
def test_unclean_root_names_the_clean_form(root, clean):
    with pytest.raises(ValueError) as ei:
        KeySpace(root)
    msg = str(ei.value)
    # Both accepted spellings, and what each would mirror.
    assert repr(root) in msg and f"{clean!r} mirrors every key starting with {clean}" in msg, msg
    assert f"{clean + '/'!r} mirrors only keys under {clean}/" in msg, msg


@pytest.mark.parametrize("root", ["", None, b"/a", 3])
def test_root_must_be_a_nonempty_str(root):
    with pytest.raises(ValueError, match="non-empty str"):
        KeySpace(root)  # type: ignore[arg-type]


def test_clean_roots_are_accepted():
    for root in ("/", "/a", "/a/b", "a", "/a.b"):
        assert KeySpace(root).root == root


def test_trailing_slash_roots_are_accepted():
    # A departure from Gazette (keyspace.py): "/a/" means the keys under /a/ only.
    for root in ("/a/", "/a/b/", "a/"):
        ks = KeySpace(root)
        assert ks.root == root and ks.root_key == root.encode()


# -- loading --------------------------------------------------------------------------------


def test_load_paginates(client, prefix):
    root = f"{prefix}/p"
    for i in range(50):
        R = int(client.put(f"{root}/k{i:03d}", f"v{i}").header.revision)
    client.put(prefix_end(root.encode()), "boundary, outside")
    client.put(f"{root}/k{50:03d}", "after R")
    client.delete(f"{root}/k000")

    progress: List[int] = []
    ks = KeySpace(root, decoders.utf8)
    ks.load(client, page_size=7, progress=progress.append)
    assert progress == [7 * i for i in range(1, 8)] + [50]  # 8 pages of 7, the last of 1
    assert len(ks.key_values) == 50
    assert_mirror_equals_etcd(ks, client)
    assert ks.header.revision == etcd_revision(client)

    # Paginated at a past revision: every page is read at R.
    old = KeySpace(root, decoders.utf8)
    old.load(client, rev=R, page_size=7)
    assert old.header.revision == R
    assert rows(old.key_values) == etcd_rows(client, old.root_key, R)
    assert [kv.key for kv in old.key_values][0] == f"{root}/k000".encode()


def test_load_pages_beyond_grpc_receive_limit(own_etcd, prefix, caplog):
    """3000 keys x 4 KiB: 12 MB, where the first page (FIRST_PAGE keys asked) exceeds 4 MiB."""
    import pyetcd

    root = f"{prefix}/big"
    c = connect(own_etcd.endpoint)  # receive limit raised to 64 MiB
    host, port = own_etcd.endpoint.rsplit(":", 1)
    raw = pyetcd.client(host, int(port))  # gRPC's default 4 MiB receive limit
    try:
        blob = "x" * 4096
        for start in range(0, 3000, 100):
            c.transaction(
                compare=[],
                failure=[],
                success=[
                    c.transactions.put(f"{root}/k{i:05d}", f"{i}:{blob}") for i in range(start, start + 100)
                ],
            )
        caplog.set_level(logging.INFO, logger="shmkeyspace.load")

        # Default limit: the first page is refused and halved until it fits; later
        # pages are sized by what fitted, so they are not refused again.
        ks = KeySpace(root, decoders.raw)
        ks.load(raw)
        halvings = [r_.getMessage() for r_ in caplog.records if "retrying with" in r_.getMessage()]
        # One run of halvings (10000 -> 625 here): no later page started over.
        assert halvings and all(h.endswith(f" {FIRST_PAGE >> i} keys") for i, h in enumerate(halvings, 1))
        assert len(ks.key_values) == 3000
        assert_mirror_equals_etcd(ks, c)

        # Raised limit (connect()): no halving needed.
        caplog.clear()
        ks2 = KeySpace(root, decoders.raw)
        ks2.load(c)
        assert not [r_ for r_ in caplog.records if "retrying with" in r_.getMessage()]
        assert ks2.key_values == ks.key_values and ks2.header.revision == ks.header.revision
    finally:
        raw.close()
        c.close()


# -- unrecoverable apply errors ------------------------------------------------------------------


def test_unrecoverable_apply_errors_leave_keyspace_unchanged(client, prefix):
    import queue

    root = f"{prefix}/u"
    client.put(f"{root}/a", "1")
    ks = KeySpace(root, decoders.utf8)
    ks.load(client)
    calls = []
    ks.observers.append(lambda: calls.append(ks.changed_keys))

    q: "queue.Queue" = queue.Queue()
    wid = client.add_watch_prefix_callback(root, q.put, start_revision=ks.header.revision + 1)
    try:
        r = int(client.put(f"{root}/b", "2").header.revision)
        valid = q.get(timeout=10)
    finally:
        client.cancel_watch(wid)
    assert [bytes(e.key) for e in valid.events] == [f"{root}/b".encode()]

    def tampered(**fields):
        h = type(valid.header)()
        h.CopyFrom(valid.header)
        for k, v in fields.items():
            setattr(h, k, v)
        return SimpleNamespace(header=h, events=list(valid.events))

    def state():
        with ks.lock:
            return ks.header, list(ks.key_values), len(calls)

    before = state()
    cid = int(valid.header.cluster_id)
    cases = [
        ((tampered(cluster_id=cid + 1),), KeySpaceError, "ClusterId mismatch"),
        ((tampered(cluster_id=0),), KeySpaceError, "ClusterId 0"),
        ((tampered(revision=ks.header.revision - 1),), KeySpaceError, "Revision mismatch"),
        # A valid response applied together with a foreign one: nothing of either.
        ((valid, tampered(cluster_id=cid + 1)), KeySpaceError, "ClusterId mismatch"),
        ((valid, RuntimeError("watch broke")), RuntimeError, "watch broke"),
    ]
    for responses, exc_type, match in cases:
        with pytest.raises(exc_type, match=match):
            ks.apply(*responses)
        assert state() == before, match

    # The untampered response does apply: the failures above were about the header.
    ks.apply(valid)
    assert ks.header.revision == r and ks.key_values.get(f"{root}/b").value == b"2"
    assert calls == [{f"{root}/b".encode()}]


# -- a watch opened ahead of time (open_watch, used by a resuming writer) ------------------


def test_watch_opened_ahead_is_used_and_gets_what_happened_meanwhile(client, prefix, monkeypatch):
    """open_watch(start) streams events from ``start`` before watch() runs; watch(first=)
    applies them without opening a second stream. A stream that no longer fits (another
    start revision) is closed and a fresh one opened; the outcome is etcd's state either way."""
    from shmkeyspace import keyspace as ks_mod

    root = f"{prefix}/early"
    client.put(f"{root}/a", "1")
    opened = []
    real_open = ks_mod._Session.open
    monkeypatch.setattr(ks_mod._Session, "open", lambda self: (opened.append(self.start), real_open(self))[1])
    for fits in (True, False):
        ks = KeySpace(root, decoders.utf8)
        ks.load(client)
        early = ks.open_watch(client, ks.header.revision + (1 if fits else 0))
        last = 0
        for i in range(20):  # while nobody applies anything
            last = int(client.put(f"{root}/k{i}", f"v{i}").header.revision)
        assert wait_until(lambda: early.responses > 0 or not fits, 10)
        opened.clear()
        stop = threading.Event()
        t = threading.Thread(target=ks.watch, args=(client, stop), kwargs={"first": early}, daemon=True)
        t.start()
        try:
            assert ks.wait_for_revision(last, 15)
            assert len(ks.key_values) == 21 and ks.key_values.get(f"{root}/k19".encode()).decoded == "v19"
            # fits: no second stream; not fitting: it was closed and one fresh stream opened
            assert len(opened) == (0 if fits else 1), opened
            assert fits or early.closed
        finally:
            stop.set()
            t.join(10)
        assert early.closed and not t.is_alive()
