"""One Reader shared by many threads, with no lock: every answer checked.

A publisher process runs the torture schedule (``torture.py``) and restarts its
Publisher every few revisions, so each restart moves readers to a new data
generation, while 8 threads of this process hammer ONE Reader with get / range /
prefixed / snapshot and check every answer against the revision it claims.
Then threads keep querying while the main thread closes the Reader: each query
either answers correctly or raises ReaderClosedError, nothing else, no crash.
Both implementations (compiled and pure Python) run the same checks.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time

import helpers_procs as hp
import pytest
import torture

from shmkeyspace import Reader, reader
from shmkeyspace.errors import ReaderClosedError, SnapshotExpiredError

THREADS = 8
BIG_KIB = 24


def publish_restarting(name: str, stop_after: float, every: int, report) -> None:
    """torture.publish_forever, but a new Publisher (a new generation) every ``every`` revisions."""
    from shmkeyspace import publisher
    from shmkeyspace.builder import ImageBuilder
    from shmkeyspace.snapshot import pack_entry

    b = ImageBuilder()
    deadline = time.monotonic() + stop_after
    r = 1
    while time.monotonic() < deadline:
        pub = publisher.Publisher(name)
        try:
            for _ in range(every):
                if r == 1:
                    items = sorted(torture.expected(1, BIG_KIB).items())
                    b.reset([(k, pack_entry(k, v, m, m, 1, 0)) for k, (v, m) in items], 1)
                else:
                    ch = torture.changes(r, BIG_KIB)
                    packed = {
                        k: None if x is None else pack_entry(k, x[0], x[1], x[1], 1, 0) for k, x in ch.items()
                    }
                    b.apply(packed, r)
                parts, total = b.parts()
                pub.publish(parts, total, r, len(b), stable=b.stable_span())
                report.value = r
                r += 1
        finally:
            pub.close()


@pytest.mark.parametrize("impl", reader.IMPLEMENTATIONS)
def test_threads_share_one_reader_through_publications_and_generations(shm_name, impl):
    ctx = mp.get_context("spawn")
    last = ctx.Value("q", 0)
    seconds = float(hp.scaled(4, 60, "SHMKEYSPACE_SOAK_THREADS_SECONDS"))
    writer = ctx.Process(target=publish_restarting, args=(shm_name, seconds + 4, 25, last))
    writer.start()
    try:
        r = Reader(shm_name, wait=20, cache_size=64, implementation=impl)
        assert r.implementation == impl
        checkers = [torture.Checker(BIG_KIB) for _ in range(THREADS)]
        gens = set()

        def hammer(i: int) -> None:
            try:
                torture._hammer_loop(r, checkers[i], random.Random(i), seconds)
            except Exception as exc:  # any exception is a failure
                checkers[i].fail(f"thread {i} raised {exc!r}")

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            gens.add(r.health().generation)
            time.sleep(0.05)
        for t in threads:
            t.join()
    finally:
        writer.join(seconds + 30)
        if writer.is_alive():
            writer.kill()
    bad = [b for c in checkers for b in c.bad]
    assert bad == [], bad[:10]
    assert all(c.checked > 20 for c in checkers), [c.checked for c in checkers]
    assert sum(len(c.revisions) for c in checkers) > THREADS, "the snapshot never moved under the threads"
    assert len(gens) >= 2, gens  # the threads were moved across generations
    r.close()


@pytest.mark.parametrize("impl", reader.IMPLEMENTATIONS)
def test_close_under_running_threads(shm_name, impl):
    """Queries racing close(): correct answers, then ReaderClosedError; nothing else."""
    ctx = mp.get_context("spawn")
    last = ctx.Value("q", 0)
    writer = ctx.Process(target=publish_restarting, args=(shm_name, 60, 25, last))
    writer.start()
    try:
        for rnd_seed in range(3):
            r = Reader(shm_name, wait=20, cache_size=16, implementation=impl)
            checkers = [torture.Checker(BIG_KIB) for _ in range(THREADS)]
            closed_seen = [0] * THREADS
            started = threading.Barrier(THREADS + 1)

            def hammer(i: int) -> None:
                rnd = random.Random(rnd_seed * 100 + i)
                started.wait()
                try:
                    while True:
                        torture._hammer_loop(r, checkers[i], rnd, 0.01)
                except ReaderClosedError:
                    closed_seen[i] += 1
                except SnapshotExpiredError:
                    checkers[i].fail("unexpected SnapshotExpiredError escaped")
                except Exception as exc:
                    checkers[i].fail(f"thread {i} raised {exc!r}")

            threads = [threading.Thread(target=hammer, args=(i,)) for i in range(THREADS)]
            for t in threads:
                t.start()
            started.wait()
            assert hp.wait_until(lambda: sum(c.checked for c in checkers) > 50 * THREADS, 60)
            r.close()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            bad = [b for c in checkers for b in c.bad]
            assert bad == [], bad[:10]
            assert closed_seen == [1] * THREADS
            with pytest.raises(ReaderClosedError):
                r.get("/t/meta")
    finally:
        writer.kill()
        writer.join(30)
