"""Snapshot views a busy host cannot break (issue 21): the writer's view grace.

A view reads the buffer that was published when it was opened; the writer rewrites
that buffer one publication after the next. Before the grace, two publications
(two 30 ms apply delays under churn) ended every view; now a buffer readers left is
rewritten only ``view_grace`` after, so a view lives at least that long, whatever
the churn. Real etcd, a real Writer, real shared memory.
"""

from __future__ import annotations

import threading

import pytest
from helpers_procs import wait_until

from shmkeyspace import Reader, Writer
from shmkeyspace.errors import InvalidSettingError, SnapshotExpiredError
from shmkeyspace.etcd import connect

GRACE = 3.0


def test_a_view_outlives_publications_under_churn_for_the_grace(etcd_server, prefix, shm_name):
    c = connect(etcd_server.endpoint)
    stop = threading.Event()
    puts = [0]

    def churn() -> None:
        cc = connect(etcd_server.endpoint)
        try:
            while not stop.is_set():
                cc.put(f"{prefix}/k{puts[0] % 50:02d}", str(puts[0]))
                puts[0] += 1
                stop.wait(0.005)
        finally:
            cc.close()

    for i in range(50):
        c.put(f"{prefix}/k{i:02d}", "0")
    w = Writer(shm_name, prefix, endpoints=etcd_server.endpoint, apply_delay=0.005, view_grace=GRACE)
    t = threading.Thread(target=churn, daemon=True)
    try:
        w.start()
        t.start()
        with Reader(shm_name) as r:
            assert wait_until(lambda: puts[0] > 20 and r.revision > 51, 60)
            with r.snapshot() as view:
                opened = view.revision
                assert len(view.prefixed(prefix)) == 50
                # A publication after the one the view reads (it retired the view's buffer)...
                assert wait_until(lambda: r.revision > opened, 60)
                # ... then churn that, without the grace, is a dozen more publications
                # (5 ms apply delay): the view's buffer would have been rewritten.
                seen = puts[0]
                assert wait_until(lambda: puts[0] >= seen + 20, 60)
                got = view.prefixed(prefix)
                assert len(got) == 50 and all(e.mod_revision <= opened for e in got)
                assert view.get(f"{prefix}/k00") is not None

                # Past the grace the view ends with the clear error, naming the guarantee.
                def expired() -> bool:
                    try:
                        view.prefixed(prefix)
                    except SnapshotExpiredError as exc:
                        assert f"views are guaranteed {GRACE:g} s" in str(exc), exc
                        return True
                    return False

                assert wait_until(expired, 60, interval=0.05)
            assert w.publisher.grace_waits > 0  # publications really waited for it
    finally:
        stop.set()
        t.join(10)
        w.stop()
        c.close()


def test_view_grace_must_not_be_negative(shm_name):
    with pytest.raises(InvalidSettingError):
        Writer(shm_name, "/p", endpoints="127.0.0.1:1", view_grace=-1)
