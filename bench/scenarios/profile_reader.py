"""Where a Reader lookup's time goes: a step-by-step breakdown and a cProfile.

    ./run bench --only profile_reader [--keys 100000] [--value-size 100]

Publishes a snapshot of the benchmark's data set straight through
``ImageBuilder`` + ``Publisher`` (no etcd: this explains costs, it is not the
benchmark), then times, per operation, the whole ``Reader.get`` and each step
its kernel takes, next to the same steps of py-lmdb and a dict. Step times are
measured in isolation (each over precomputed inputs), so they add up only
roughly: loop and call overheads are counted once per line. Each line is the
fastest of 5 loops (noise on a shared machine only ever adds time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import uuid

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if p not in sys.path:
        sys.path.insert(0, p)

import json  # noqa: E402

from xxhash import xxh3_64_intdigest  # noqa: E402

from scenarios import common  # noqa: E402
from scenarios.peers import READER_UNPACKB, UNPACKER_NAME, LmdbPeer  # noqa: E402
from shmkeyspace import Reader, publisher  # noqa: E402
from shmkeyspace import reader as reader_mod  # noqa: E402
from shmkeyspace.builder import ImageBuilder  # noqa: E402
from shmkeyspace.snapshot import pack_entry  # noqa: E402


class _Noop:
    def get(self, key):
        return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--lookups", type=int, default=20_000)
    args = ap.parse_args(argv)
    n, vs = args.keys, args.value_size
    prefix = common.config_prefix(n, vs)
    keys = [common.key_of(prefix, i) for i in range(n)]
    items = []
    for i, k in enumerate(keys):
        kb = k.encode()
        items.append((kb, pack_entry(kb, json.loads(common.make_value(i, vs)), i + 2, i + 2, 1, 0)))
    name = f"prof-{uuid.uuid4().hex[:8]}"
    lm = LmdbPeer()
    try:
        with publisher.Publisher(name, unlink_on_close=True) as pub:
            b = ImageBuilder()
            b.reset(items, n + 1)
            parts, total = b.parts()
            pub.publish(parts, total, n + 1, n)
            lm.fill(items)
            run(name, keys, lm, args.lookups)
    finally:
        lm.close()


def run(name: str, keys, lm: LmdbPeer, m: int) -> None:
    r = common.rng("profile")
    sample = [keys[i] for i in r.sample(range(len(keys)), min(m, len(keys)))]
    rd = Reader(name, cache_size=0, implementation="python")
    rc = Reader(name, implementation="python")
    with rd.snapshot() as snap:
        view = snap._view  # the ImageView whose kernels are timed below
    table, mask, arena = view.table, view.mask, view.arena
    kbs = [k.encode() for k in sample]
    hashes = [xxh3_64_intdigest(kb) or 1 for kb in kbs]
    # slot of each key (first probe position) and its (offset, end)
    locs, slots = [], []
    for _kb, h in zip(kbs, hashes):
        i = h & mask
        while table[2 * i] != h:
            i = (i + 1) & mask
        slots.append(2 * i)
        ol = table[2 * i + 1]
        locs.append((ol & 0xFFFFFFFF, (ol & 0xFFFFFFFF) + (ol >> 32)))
    slices = [arena[o:e] for o, e in locs]
    lists = [READER_UNPACKB(s) for s in slices]
    Entry = reader_mod.Entry
    new = tuple.__new__
    env = lm.env
    with env.begin(buffers=True) as txn:
        lbytes = [bytes(txn.get(kb)) for kb in kbs]
    noop = _Noop()
    d = {k: None for k in keys}
    lookup = type(view).lookup

    def med(fn, args):
        # The fastest of 5 loops: for explaining where time goes, noise only adds.
        return min(common.time_loop(fn, [list(args)] * 5))

    def begin_end(_):
        with env.begin(buffers=True):
            pass

    txn = env.begin(buffers=True)
    rows = [
        ("Reader.get (cache_size=0), whole call", med(rd.get, sample)),
        (
            "  ImageView.lookup(view, key) kernel alone",
            med(lambda k: lookup(view, k), sample),
        ),
        ("  key.encode()", med(str.encode, sample)),
        ("  xxh3_64_intdigest(kb)", med(xxh3_64_intdigest, kbs)),
        ("  table[i] + table[i + 1] (memoryview 'Q')", med(lambda i: (table[i], table[i + 1]), slots)),
        ("  arena[off:end] (memoryview slice)", med(lambda oe: arena[oe[0] : oe[1]], locs)),
        (f"  unpack entry ({UNPACKER_NAME})", med(READER_UNPACKB, slices)),
        ("  tuple.__new__(Entry, lst)", med(lambda lst: new(Entry, lst), lists)),
        ("  floor: a no-op Python method call", med(noop.get, sample)),
        ("lmdb get: txn + get + unpack, whole", med(lm.get, kbs)),
        ("  env.begin() + txn exit", med(begin_end, kbs)),
        ("  txn.get(kb) in an open txn", med(txn.get, kbs)),
        (f"  unpack entry ({UNPACKER_NAME})", med(READER_UNPACKB, lbytes)),
        ("Reader.get, repeated key (cache hit)", med(rc.get, [sample[0]] * len(sample))),
        ("dict.get, repeated key", med(d.get, [sample[0]] * len(sample))),
        ("dict.get, random keys", med(d.get, sample)),
    ]
    # -- a range of 100 keys, step by step (contiguous arena: a fresh snapshot) ------------------
    L = common.RANGE_LEN
    idx = [r.randrange(len(keys) - L) for _ in range(2000)]
    bounds = [(keys[i].encode(), keys[i + L].encode()) for i in idx]
    starts = [(i, i + L) for i in idx]
    order = view.order

    def offs_lens(ij):
        i, j = ij
        return order[2 * i : 2 * j : 2].tolist(), order[2 * i + 1 : 2 * j : 2].tolist()

    ol = [offs_lens(ij) for ij in starts]
    blobs = [b"\xdd" + L.to_bytes(4, "big") + arena[o[0] : o[0] + sum(ln)] for o, ln in ol]
    unpacked = [READER_UNPACKB(bl) for bl in blobs]
    entry_from = getattr(reader_mod, "_entry_from_list", lambda lst: new(Entry, lst))
    rows += [
        (
            "Reader.range(k[i], k[i+100]), whole call",
            med(lambda b: rd.range(b[0], b[1]), [(keys[i], keys[i + L]) for i in idx]),
        ),
        (
            "  view.lower_bound(key) x 2",
            med(lambda b: (view.lower_bound(b[0]), view.lower_bound(b[1])), bounds),
        ),
        ("  order slices .tolist() x 2", med(offs_lens, starts)),
        (
            "  b'\\xdd' + count + arena slice (copy)",
            med(lambda o: b"\xdd" + L.to_bytes(4, "big") + arena[o[0][0] : o[0][0] + sum(o[1])], ol),
        ),
        (f"  unpack 100 entries at once ({UNPACKER_NAME})", med(READER_UNPACKB, blobs)),
        ("  list(map(_entry_from_list, lists))", med(lambda ls: list(map(entry_from, ls)), unpacked)),
        ("lmdb cursor set_range + 100 next + unpack", med(lambda b: lm.range(b[0], L), bounds)),
        ("dict: bisect + 100 lookups", med(lambda b: [d[k] for k in keys[b[0] : b[1]]], starts)),
    ]
    txn.abort()
    print(
        f"{len(keys):,} keys, value ~{len(lbytes[0])} B packed; ns per operation, fastest of 5 loops x {len(sample):,}"
    )
    for label, ns in rows:
        print(f"{label:48s} {ns:9.0f}")
    pr = cProfile.Profile()
    get = rd.get
    pr.enable()
    for k in sample:
        get(k)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(8)
    print("\ncProfile of Reader.get (cache_size=0), random keys (profiler overhead inflates small calls):")
    print("\n".join(s.getvalue().splitlines()[4:20]))
    rd.close()
    rc.close()


if __name__ == "__main__":
    main()
