"""A deterministic publication schedule whose every answer can be checked, and the
processes that publish and verify it. Shared by the torture and reliability tests.

At revision R (R >= 1) the published snapshot holds exactly:

* ``/t/meta``  -> R
* ``/t/k{i}`` (i < K) -> [m, i] with mod_revision m = R - R % (i+1) (or 1 if that is 0):
  key i is rewritten at every revision divisible by i+1;
* ``/t/d{i}`` (i < D) present iff ((w // 7) + i) % 3 != 0, where w = R - R % 7
  (or 1 if that is 0): the d-keys are rewritten or deleted every 7 revisions;
* ``/t/big`` -> bytes of a size that varies with R (up to ``big_kib`` KiB), so
  images grow and shrink and generations move.

Most revisions change a handful of keys (the writer's incremental path); every
7th rewrites all d-keys. ``expected(R)`` gives the full content, ``verify_*``
check answers against it.
"""

from __future__ import annotations

import os
import random
import time
from typing import Dict, List, Optional, Tuple

K = 40
D = 30


def k_key(i: int) -> bytes:
    return b"/t/k%03d" % i


def d_key(i: int) -> bytes:
    return b"/t/d%03d" % i


def big_size(r: int, big_kib: int) -> int:
    return ((r * 7919) % (big_kib + 1)) * 1024


def _d_write(r: int) -> int:
    w = r - r % 7
    return w or 1


def expected(r: int, big_kib: int) -> Dict[bytes, Tuple[object, int]]:
    """{raw key: (decoded, mod_revision)} of the snapshot at revision ``r``."""
    out: Dict[bytes, Tuple[object, int]] = {b"/t/meta": (r, r), b"/t/big": (b"b" * big_size(r, big_kib), r)}
    for i in range(K):
        m = r - r % (i + 1) or 1
        out[k_key(i)] = ([m, i], m)
    w = _d_write(r)
    for i in range(D):
        if ((w // 7) + i) % 3 != 0:
            out[d_key(i)] = ([w, i], w)
    return out


def changes(r: int, big_kib: int) -> Dict[bytes, Optional[Tuple[object, int]]]:
    """What revision ``r`` changes relative to ``r - 1`` ({key: (decoded, mod) or None})."""
    if r == 1:
        return dict(expected(1, big_kib))
    exp = expected(r, big_kib)
    out: Dict[bytes, Optional[Tuple[object, int]]] = {}
    for k, (v, m) in exp.items():
        if m == r:
            out[k] = (v, m)
    if r % 7 == 0:
        for i in range(D):
            if d_key(i) not in exp:
                out[d_key(i)] = None
    return out


def publish_forever(
    name: str, big_kib: int, stop_after: float, start_rev: int = 1, report=None, view_grace: float = 0.0
) -> int:
    """Publish revisions start_rev, start_rev+1, ... as fast as possible for ``stop_after`` s.

    Runs in a child process. Returns (and ``report.put``s) the last revision published.
    ``view_grace`` > 0: three buffers in rotation, a publication waiting for the one
    it writes to have rested that long (what a Writer does by default).
    """
    from shmkeyspace import publisher
    from shmkeyspace.builder import ImageBuilder
    from shmkeyspace.snapshot import pack_entry

    pub = publisher.Publisher(name, view_grace=view_grace)
    b = ImageBuilder()
    deadline = time.monotonic() + stop_after
    r = start_rev
    first = True
    while time.monotonic() < deadline:
        if first:
            items = sorted(expected(r, big_kib).items())
            b.reset([(k, pack_entry(k, v, m, m, 1, 0)) for k, (v, m) in items], r)
            first = False
        else:
            ch = changes(r, big_kib)
            b.apply(
                {k: None if x is None else pack_entry(k, x[0], x[1], x[1], 1, 0) for k, x in ch.items()}, r
            )
        parts, total = b.parts()
        pub.publish(parts, total, r, len(b), stable=b.stable_span())
        if report is not None and r % 50 == 0:
            report.value = r
        r += 1
    if report is not None:
        report.value = r - 1
    pub.close()
    return r - 1


class Checker:
    """Verifies reader answers against the schedule; counts what it saw."""

    def __init__(self, big_kib: int) -> None:
        self.big_kib = big_kib
        self.checked = 0
        self.bad: List[str] = []
        self.revisions = set()
        self.expired = 0

    def fail(self, msg: str) -> None:
        if len(self.bad) < 20:
            self.bad.append(msg)
        else:
            self.bad.append("...")

    def entries(self, r: int, got, lo: bytes, hi: Optional[bytes]) -> None:
        exp = expected(r, self.big_kib)
        want = sorted(k for k in exp if k >= lo and (hi is None or k < hi))
        keys = [e.key.encode() if isinstance(e.key, str) else e.key for e in got]
        if keys != want:
            self.fail(f"rev {r}: range [{lo!r},{hi!r}) keys {keys[:5]}... != {want[:5]}...")
            return
        for e, k in zip(got, keys):
            v, m = exp[k]
            if e.decoded != v or e.mod_revision != m:
                self.fail(
                    f"rev {r}: {k!r} = ({str(e.decoded)[:40]}, {e.mod_revision}) != ({str(v)[:40]}, {m})"
                )
                return
        self.checked += 1

    def entry(self, e, k: bytes) -> None:
        """A plain get: the entry must be one the schedule ever published."""
        if e is None:
            if k.startswith(b"/t/d"):
                self.checked += 1
                return
            self.fail(f"get {k!r} returned None")
            return
        m = e.mod_revision
        exp = expected(m, self.big_kib).get(k)
        if exp is None or exp != (e.decoded, m):
            self.fail(f"get {k!r}: ({str(e.decoded)[:40]}, {m}) was never published")
            return
        self.checked += 1


def hammer(
    name: str, big_kib: int, seconds: float, seed: int, out, fenced: bool = False, impl: Optional[str] = None
) -> None:
    """A reader process: random get/range/prefixed/snapshot, every answer checked.

    ``fenced`` forces the reader's weak-memory path (barriers, no fast path) that
    aarch64 takes, so x86 CI exercises its logic too.
    """
    from shmkeyspace import Reader

    rnd = random.Random(seed)
    c = Checker(big_kib)
    r = Reader(name, wait=10, cache_size=rnd.choice([0, 64]), implementation=impl)
    r._fence = fenced
    ops = 0
    try:
        ops = _hammer_loop(r, c, rnd, seconds)
    except Exception as exc:  # any exception is a failure the parent must see
        c.fail(f"reader raised {exc!r}")
    out.put(
        {
            "checked": c.checked,
            "bad": c.bad,
            "revisions": len(c.revisions),
            "retries": r.retries,
            "expired": c.expired,
            "ops": ops,
            "pid": os.getpid(),
            "implementation": r.implementation,
        }
    )
    r.close()


def _hammer_loop(r, c: "Checker", rnd: random.Random, seconds: float) -> int:
    from shmkeyspace.errors import SnapshotExpiredError

    deadline = time.monotonic() + seconds
    ops = 0
    while time.monotonic() < deadline:
        op = rnd.random()
        ops += 1
        if op < 0.35:
            k = k_key(rnd.randrange(K)) if rnd.random() < 0.6 else d_key(rnd.randrange(D))
            c.entry(r.get(k), k)
        elif op < 0.6:
            got = r.range(b"/t/d", None)  # ends with /t/meta: names the revision
            rev = got[-1].decoded if got and got[-1].key == "/t/meta" else None
            if rev is None:
                c.fail("range to the end lost /t/meta")
                continue
            c.revisions.add(rev)
            c.entries(rev, got, b"/t/d", None)
        elif op < 0.75:
            got = r.prefixed(b"/t/")
            rev = next((e.decoded for e in got if e.key == "/t/meta"), None)
            if rev is None:
                c.fail("prefixed lost /t/meta")
                continue
            c.entries(rev, got, b"/t/", b"/t0")
        else:
            try:
                with r.snapshot(copy=rnd.random() < 0.2) as s:
                    rev = s.revision
                    c.revisions.add(rev)
                    meta = s.get("/t/meta")
                    if meta is None or meta.decoded != rev:
                        c.fail(f"snapshot at {rev}: meta = {meta}")
                        continue
                    lo = k_key(rnd.randrange(K))
                    c.entries(rev, s.range(lo, b"/t/k999"), lo, b"/t/k999")
                    c.entries(rev, s.prefixed(b"/t/d"), b"/t/d", b"/t/e")
            except SnapshotExpiredError:
                c.expired += 1
    return ops
