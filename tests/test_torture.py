"""Multi-process torture test of the seqlock: no torn read, ever.

A publisher process publishes the schedule of ``torture.py`` as fast as it can
(incremental updates, deletions, size changes, generation growth) while reader
processes run get / range / prefixed / snapshot and check every answer against
the revision it claims. The test also asserts that the race really happened:
readers retried because publications landed under them.
"""

from __future__ import annotations

import multiprocessing as mp

import helpers_procs as hp
import pytest
import torture

from shmkeyspace import Reader, publisher
from shmkeyspace import reader as reader_mod


def _paths():
    """The Python reader's x86 and fenced (aarch64) paths, and the compiled one
    (acquire loads/fences on every CPU: it has no separate fenced path)."""
    out = [("python", False), ("python", True)]
    if "c" in reader_mod.IMPLEMENTATIONS:
        out.append(("c", False))
    return out


@pytest.mark.parametrize(
    "impl,fenced,grace",
    [pytest.param(i, f, 0.0, id=f"{i}-{'fenced' if f else 'x86'}-path") for i, f in _paths()]
    + [pytest.param("python", False, 0.002, id="python-x86-path-3-buffers")],
)
def test_no_torn_reads_under_continuous_publication(shm_name, impl, fenced, grace):
    """``grace`` > 0: three buffers in rotation (a Writer's default), where snapshot
    views count on the rotation to live longer (2 * (buffers - 1) seq moves)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    last = ctx.Value("q", 0)
    seconds = float(hp.scaled(6, 120, "SHMKEYSPACE_SOAK_TORTURE_SECONDS"))
    writer = ctx.Process(target=torture.publish_forever, args=(shm_name, 48, seconds + 4, 1, last, grace))
    writer.start()
    readers = []
    try:
        Reader(shm_name, wait=20).close()  # first publication is there
        readers = [
            ctx.Process(target=torture.hammer, args=(shm_name, 48, seconds, seed, out, fenced, impl))
            for seed in range(3)
        ]
        for p in readers:
            p.start()
        results = [out.get(timeout=seconds + 60) for _ in readers]
    finally:
        for p in readers:
            p.join(10)
            if p.is_alive():
                p.kill()
        writer.join(seconds + 30)
        if writer.is_alive():
            writer.kill()
    assert writer.exitcode == 0
    bad = [b for r in results for b in r["bad"]]
    checked = sum(r["checked"] for r in results)
    hp.report_counts(
        f"seqlock torture ({impl} {'fenced' if fenced else 'x86'} reader path)",
        faults=last.value,
        answers=checked,
        inconsistencies=len(bad),
        retries=sum(r["retries"] for r in results),
        seconds=seconds,
    )
    assert bad == [], bad
    assert {r["implementation"] for r in results} == {impl}
    assert checked > 300, results
    # The race was real: every reader saw the snapshot move, and reads were retried.
    assert all(r["revisions"] > 5 for r in results), results
    assert sum(r["retries"] for r in results) + sum(r["expired"] for r in results) > 0, results
    assert last.value > 100  # publications happened throughout


def test_schedule_is_self_consistent():
    """The checker is not vacuous: a wrong revision's data is caught."""
    big = 4
    c = torture.Checker(big)
    exp = torture.expected(20, big)

    class E:
        def __init__(self, k, v, m):
            self.key, self.decoded, self.mod_revision = k.decode(), v, m

    good = [E(k, v, m) for k, (v, m) in sorted(exp.items())]
    c.entries(20, good, b"", None)
    assert c.bad == [] and c.checked == 1
    c.entries(21, good, b"", None)  # claims revision 21: meta and k-keys disagree
    assert c.bad
    # Applying changes(r) to expected(r-1) gives expected(r), for a stretch of revisions.
    state = dict(torture.expected(1, big))
    for r in range(2, 60):
        for k, x in torture.changes(r, big).items():
            if x is None:
                state.pop(k, None)
            else:
                state[k] = x
        assert state == torture.expected(r, big), r


def test_generation_growth_under_live_readers(shm_name):
    """A Reader attached at a small generation follows the writer through several
    larger ones (and a smaller one), and old generations are unlinked."""
    import os

    from shmkeyspace.builder import ImageBuilder
    from shmkeyspace.snapshot import pack_entry

    b = ImageBuilder()
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        b.reset([(b"/g/a", pack_entry(b"/g/a", "x", 1, 1, 1, 0))], 1)
        parts, total = b.parts()
        pub.publish(parts, total, 1, 1)
        r = Reader(shm_name, cache_size=0)
        gens = {r.health().generation}
        for rev, kib in enumerate([600, 1500, 4000, 9000, 20, 9000], start=2):
            b.apply({b"/g/big": pack_entry(b"/g/big", b"z" * kib * 1024, rev, rev, 1, 0)}, rev)
            parts, total = b.parts()
            pub.publish(parts, total, rev, len(b))
            e = r.get("/g/big")
            assert e is not None and len(e.decoded) == kib * 1024 and e.mod_revision == rev
            assert r.get("/g/a").decoded == "x"
            gens.add(r.health().generation)
        assert len(gens) >= 4, gens
        live = [f for f in os.listdir("/dev/shm") if f.startswith(f"shmks.{shm_name}.")]
        assert live == [f"shmks.{shm_name}.{pub.gen}"], live
        r.close()
