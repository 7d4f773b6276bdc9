"""Staleness (issue 17): a hung or cut-off etcd is detected, reported and failed over.

Real etcd processes only: a single member SIGSTOPped, and a 3-member cluster on
loopback in which the writer's member is SIGSTOPped, or cut off from its peers
by SIGSTOPping the other two. Tests wait on conditions with generous deadlines;
the times from freeze to ``stale`` and to failover are printed (run with ``-s``)
and reported to $SHMKEYSPACE_SOAK_REPORT, never asserted.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, List, Optional

import helpers_procs as hp
import pytest

from shmkeyspace import Reader, Writer
from shmkeyspace.embedded import EtcdCluster
from shmkeyspace.etcd import WatchStream, connect
from shmkeyspace.key_values import prefix_end

STALE_AFTER = 1.5  # small, so the tests are quick; the default is 5 s
LONG = 60.0  # generous deadline for anything that must happen eventually


def _mirror_equals_etcd(reader: Reader, client: Any, prefix: str) -> int:
    """The published snapshot equals etcd's range at the snapshot's revision, key by key."""
    with reader.snapshot(copy=True) as s:
        rev = s.revision
        mine = [(e.key, e.decoded, e.create_revision, e.mod_revision, e.version) for e in s.prefixed(prefix)]
    p = prefix.encode()
    resp = client.get_range_response(p, prefix_end(p), revision=rev)
    theirs = [
        (bytes(kv.key).decode(), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.version)
        for kv in resp.kvs
    ]
    assert mine == theirs
    return len(mine)


def _put(client: Any, key: str, value: str) -> int:
    """Put, retrying while the cluster has no leader (a frozen leader: an election runs)."""
    deadline = time.monotonic() + LONG
    while True:
        try:
            return int(client.put(key, value).header.revision)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class _Watcher:
    """Polls a Reader's health (and the writer's endpoint) on a thread, recording first times."""

    def __init__(self, reader: Reader, writer: Writer) -> None:
        self.reader, self.writer = reader, writer
        self.t0 = time.monotonic()
        self.first_stale: Optional[float] = None
        self.first_move: Optional[float] = None
        self.endpoint = writer.endpoint
        self.samples: List[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            h = self.reader.health()
            now = time.monotonic() - self.t0
            if h.stale and self.first_stale is None:
                self.first_stale = now
                self.samples.append(h)
            if self.first_move is None and self.writer.endpoint != self.endpoint:
                self.first_move = now
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _report(test: str, **times: Optional[float]) -> None:
    shown = {k: (None if v is None else round(v, 3)) for k, v in times.items()}
    print(f"\n{test}: {shown}")
    hp.report_counts(test, **shown)


# -- the control-block words and what readers make of them ------------------------------


def test_health_reads_contact_words(shm_name):
    from shmkeyspace import publisher
    from shmkeyspace.builder import ImageBuilder
    from shmkeyspace.snapshot import pack_entry

    pub = publisher.Publisher(shm_name)
    try:
        b = ImageBuilder()
        b.reset([(b"/s/a", pack_entry(b"/s/a", 1, 1, 1, 1, 0))], 1)
        parts, total = b.parts()
        pub.publish(parts, total, 1, len(b))
        with Reader(shm_name) as r:
            # A writer that does not track contact (stale_after 0): only liveness counts.
            h = r.health()
            assert h.writer_alive and not h.stale and h.etcd_contact_age is None
            # One that does, before its first contact: stale.
            pub.set_stale_after(2.0)
            h = r.health()
            assert h.stale and h.etcd_contact_age is None
            pub.set_contact()
            h = r.health()
            assert not h.stale and 0 <= h.etcd_contact_age < 2.0
            pub.set_contact(time.monotonic_ns() - 3_000_000_000)
            h = r.health()
            assert h.stale and h.etcd_contact_age >= 3.0 and h.writer_alive
            pub.set_contact()
    finally:
        pub.close()
    with Reader(shm_name) as r:
        h = r.health()
        assert not h.writer_alive and h.stale  # a dead writer's mirror is stale
    pub.set_contact()  # after close: a no-op, not a crash


def test_stat_shows_contact(etcd_server, prefix, shm_name, python_env):
    import json
    import subprocess

    w = Writer(shm_name, prefix, endpoints=etcd_server.endpoint, stale_after=3.0)
    try:
        w.start()
        run = [hp.PYTHON, "-m", "shmkeyspace", "stat", shm_name]
        out = subprocess.run(run, env=python_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "etcd contact" in out.stdout and "fresh" in out.stdout, out.stdout
        out = subprocess.run([*run, "--json"], env=python_env, capture_output=True, text=True, timeout=60)
        info = json.loads(out.stdout)
        assert info["stale"] is False and 0 <= info["etcd_contact_age"] < 3.0, info
    finally:
        w.stop()


# -- one etcd, SIGSTOPped ------------------------------------------------------------------


def test_single_etcd_frozen_reports_stale_then_recovers(own_etcd, prefix, shm_name):
    c = connect(own_etcd.endpoint)
    for i in range(10):
        _put(c, f"{prefix}/k{i}", f"v{i}")
    w = Writer(shm_name, prefix, endpoints=own_etcd.endpoint, stale_after=STALE_AFTER, apply_delay=0.005)
    r = None
    try:
        w.start()
        r = Reader(shm_name)
        assert hp.wait_until(lambda: not r.health().stale, LONG)
        h = r.health()
        assert h.writer_alive and h.etcd_contact_age is not None
        rev_before = r.revision

        watcher = _Watcher(r, w)
        frozen_at = time.monotonic()
        own_etcd.freeze()
        try:
            assert hp.wait_until(lambda: r.health().stale, LONG), r.health()
            stale = r.health()
            # The writer is alive (heartbeating), only out of touch, and its last
            # contact came before the freeze (within what was already in flight).
            assert stale.writer_alive
            assert stale.etcd_contact_age is not None and stale.etcd_contact_age > STALE_AFTER
            assert time.monotonic() - stale.etcd_contact_age <= frozen_at + 0.5
            # The contact age keeps growing, and readers keep the last snapshot.
            assert hp.wait_until(lambda: r.health().etcd_contact_age > stale.etcd_contact_age + 0.5, LONG)
            assert r.health().stale and r.revision == rev_before
            assert r.get(f"{prefix}/k3").decoded == b"v3"
        finally:
            own_etcd.thaw()
            thawed_at = time.monotonic()
        watcher.stop()
        assert hp.wait_until(lambda: not r.health().stale, LONG), r.health()
        recovered = time.monotonic() - thawed_at
        h = r.health()
        assert h.writer_alive and h.etcd_contact_age is not None and h.etcd_contact_age < STALE_AFTER
        rev = _put(c, f"{prefix}/after", "x")
        assert r.wait_for_revision(rev, LONG)
        assert _mirror_equals_etcd(r, c, prefix) == 11
        first = watcher.first_stale
        _report(
            "single_etcd_frozen",
            freeze_to_stale=None if first is None else watcher.t0 + first - frozen_at,
            thaw_to_fresh=recovered,
        )
    finally:
        if r is not None:
            r.close()
        w.stop()
        c.close()


# -- a 3-member cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with EtcdCluster(3) as cl:
        yield cl


def _other_client(cluster: EtcdCluster, not_endpoint: Optional[str]) -> Any:
    """A client of a member other than ``not_endpoint``."""
    ep = next(m.endpoint for m in cluster.members if m.endpoint != not_endpoint)
    return connect(ep)


def _leader_endpoint(cluster: EtcdCluster) -> str:
    """The client endpoint of the cluster's current leader (waiting for one)."""
    c = connect(cluster.endpoints)
    try:
        out: List[str] = []

        def leader() -> bool:
            try:
                st = c.status()
            except Exception:
                return False
            if st.leader is None:
                return False
            out.append(st.leader.client_urls[0].split("//", 1)[-1])
            return True

        assert hp.wait_until(leader, LONG)
        return out[-1]
    finally:
        c.close()


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_cluster_writer_fails_over_from_a_frozen_member(cluster, prefix, shm_name, role):
    leader = _leader_endpoint(cluster)
    first = leader if role == "leader" else next(m.endpoint for m in cluster.members if m.endpoint != leader)
    endpoints = ",".join([first] + [m.endpoint for m in cluster.members if m.endpoint != first])
    w = Writer(shm_name, prefix, endpoints=endpoints, stale_after=STALE_AFTER, apply_delay=0.005)
    r = c = None
    try:
        c0 = connect(cluster.endpoints)
        for i in range(10):
            _put(c0, f"{prefix}/k{i}", f"v{i}")
        c0.close()
        w.start()
        r = Reader(shm_name)
        assert hp.wait_until(lambda: not r.health().stale, LONG)
        assert w.endpoint == first
        victim = cluster.member(first)
        c = _other_client(cluster, first)

        watcher = _Watcher(r, w)
        frozen_at = time.monotonic()
        victim.freeze()
        try:
            # A put through a healthy member reaches readers while the old member hangs.
            rev = _put(c, f"{prefix}/during", "d")
            assert r.wait_for_revision(rev, LONG), (r.revision, rev, w.endpoint)
            assert w.endpoint != first
            assert hp.wait_until(lambda: not r.health().stale, LONG), r.health()
            assert _mirror_equals_etcd(r, c, prefix) == 11
        finally:
            victim.thaw()
        watcher.stop()
        rev = _put(c, f"{prefix}/after", "a")
        assert r.wait_for_revision(rev, LONG)
        assert _mirror_equals_etcd(r, c, prefix) == 12
        _report(
            f"cluster_{role}_frozen",
            freeze_to_stale=None
            if watcher.first_stale is None
            else watcher.t0 + watcher.first_stale - frozen_at,
            freeze_to_failover=None
            if watcher.first_move is None
            else watcher.t0 + watcher.first_move - frozen_at,
        )
    finally:
        if r is not None:
            r.close()
        w.stop()
        if c is not None:
            c.close()


def test_cluster_member_cut_off_from_its_peers(cluster, prefix, shm_name, caplog):
    caplog.set_level(logging.INFO, logger="shmkeyspace")
    w = Writer(shm_name, prefix, endpoints=cluster.endpoints, stale_after=STALE_AFTER, apply_delay=0.005)
    r = c = None
    peers: List[Any] = []
    try:
        c0 = connect(cluster.endpoints)
        _put(c0, f"{prefix}/k0", "v0")
        c0.close()
        w.start()
        r = Reader(shm_name)
        assert hp.wait_until(lambda: not r.health().stale, LONG)
        mine = w.endpoint
        assert mine is not None
        peers = [m for m in cluster.members if m.endpoint != mine]

        watcher = _Watcher(r, w)
        frozen_at = time.monotonic()
        for m in peers:
            m.freeze()
        try:
            # Its member stays up but loses its leader and no other member answers,
            # so readers see stale. Which of two mechanisms ends the stream first is
            # a race: etcd cancelling the require-leader watch (~3 election timeouts,
            # test_require_leader_watch_canceled_on_leader_loss proves it on its own)
            # or the writer's watchdog (a progress answer late by STALE_AFTER on a
            # loaded machine); either way the outcome below must hold.
            assert hp.wait_until(lambda: r.health().stale, LONG), r.health()
            assert r.health().writer_alive and r.get(f"{prefix}/k0").decoded == b"v0"
        finally:
            for m in peers:
                m.thaw()
            thawed_at = time.monotonic()
        assert hp.wait_until(lambda: not r.health().stale, LONG), r.health()
        recovered = time.monotonic() - thawed_at
        watcher.stop()
        c = _other_client(cluster, mine)
        rev = _put(c, f"{prefix}/after", "a")
        assert r.wait_for_revision(rev, LONG)
        assert _mirror_equals_etcd(r, c, prefix) == 2
        _report(
            "cluster_member_cut_off",
            freeze_to_stale=None
            if watcher.first_stale is None
            else watcher.t0 + watcher.first_stale - frozen_at,
            thaw_to_fresh=recovered,
        )
    finally:
        for m in peers:
            m.thaw()
        if r is not None:
            r.close()
        w.stop()
        if c is not None:
            c.close()


def test_require_leader_watch_canceled_on_leader_loss(cluster, prefix):
    """etcd cancels a require-leader watch once its member has lost the leader.

    The mechanism on its own, with no watchdog to race it: the writer's watch is
    a WatchStream with require_leader (the default), so a member cut off from
    its peers cannot keep serving it an empty stream.
    """
    member, peers = cluster.members[0], cluster.members[1:]
    c = connect(member.endpoint)
    got: "queue.Queue[Any]" = queue.Queue()
    key = prefix.encode()
    ws = WatchStream(c, key, prefix_end(key), 0, got.put)
    try:
        first = got.get(timeout=LONG)
        assert not isinstance(first, BaseException), first  # created while the member has a leader
        for m in peers:
            m.freeze()
        try:
            deadline = time.monotonic() + LONG
            err = None
            while err is None and time.monotonic() < deadline:
                item = got.get(timeout=max(0.0, deadline - time.monotonic()))
                if isinstance(item, BaseException):
                    err = item
            assert err is not None, "the watch was not cancelled"
            details = err.details() if hasattr(err, "details") else str(err)
            assert "no leader" in details, details
        finally:
            for m in peers:
                m.thaw()
    finally:
        ws.close()
        c.close()


def test_writer_with_auth_limited_to_its_prefix(own_etcd, prefix, shm_name):
    """Probes and the watch carry the auth token; the probe reads only the prefix's own key."""
    import subprocess

    from shmkeyspace.embedded import find_etcd_binary

    etcdctl = find_etcd_binary() + "ctl"
    if not os.access(etcdctl, os.X_OK):
        pytest.skip("no etcdctl beside etcd")

    def ctl(*args: str, user: Optional[str] = None) -> None:
        cmd = [etcdctl, "--endpoints", own_etcd.endpoint, *(["--user", user] if user else []), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    ctl("put", f"{prefix}/a", "1")
    ctl("user", "add", "root:rootpw")
    ctl("role", "add", "mirror")
    ctl("role", "grant-permission", "mirror", "--prefix=true", "read", prefix)
    ctl("user", "add", "mirror:mirrorpw")
    ctl("user", "grant-role", "mirror", "mirror")
    ctl("auth", "enable")
    w = Writer(
        shm_name,
        prefix,
        endpoints=own_etcd.endpoint,
        connect_args={"user": "mirror", "password": "mirrorpw"},
        stale_after=STALE_AFTER,
        apply_delay=0.005,
    )
    try:
        w.start()
        with Reader(shm_name) as r:
            assert r.get(f"{prefix}/a").decoded == b"1"
            ctl("put", f"{prefix}/b", "2", user="root:rootpw")
            assert hp.wait_until(lambda: r.get(f"{prefix}/b") is not None, LONG)

            # While the prefix is quiet, answers to the writer's own requests keep
            # coming: the contact time moves on.
            def contact_time() -> float:
                h = r.health()
                assert h.etcd_contact_age is not None
                return time.monotonic() - h.etcd_contact_age

            first = contact_time()
            assert hp.wait_until(lambda: contact_time() > first + 2 * STALE_AFTER, LONG)
            assert r.health().writer_alive
    finally:
        w.stop()
