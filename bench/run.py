#!/usr/bin/env python3
"""Side-by-side benchmarks of shmkeyspace against its peers, in one run.

    ./run bench                                  # 10k and 100k keys, ~100 B and ~1 KB values
    ./run bench --keys 10000,100000,1000000      # add 1M keys
    ./run bench --smoke                          # tiny, < 60 s (used by tests/test_bench_smoke.py)
    ./run bench --only reads,writer --out /tmp/b
    ./run bench --only fail_static --keys 1000000   # a standalone scenario, its own options

For each (key count, value size) a private etcd is started and seeded through
transactions, a real Writer process loads and publishes the prefix, and every
scenario runs against that snapshot and against peers holding the same data:
py-lmdb, a plain dict, direct etcd reads (pyetcd) and shared-memory-dict.
Writes ``results.md``, ``results.json`` and (with matplotlib) ``results.png``
to ``--out`` (default ``bench/results``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
import uuid
from typing import Any, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for p in (ROOT, BENCH_DIR):
    if p not in sys.path:
        sys.path.insert(0, p)

from scenarios import common, memory, reads, report, scaling, visibility  # noqa: E402
from scenarios import writer as writer_scenario  # noqa: E402
from scenarios.peers import UNPACKER_NAME, DictPeer, EtcdPeer, LmdbPeer, SmdPeer, smd_available  # noqa: E402

SCENARIOS = ["reads", "scaling", "memory", "writer", "visibility"]
#: Scenarios that set up what they measure themselves (their own etcd, writers,
#: options): ``--only NAME`` runs one, and every other argument is its own
#: (``./run bench --only NAME --help`` lists them). Each is bench/scenarios/NAME.py.
STANDALONE = {
    "apply_paths": "20k-put bursts and catch-up, compiled vs Python apply path (issue 22)",
    "fail_static": "warm start, restart behind etcd, persist cost (issue 12; ~10 min at 1M keys)",
    "feed": "wake-ups, idle waiter CPU, changes() (issue 14; ~1 min)",
    "fleet": "K writers direct vs one grpc-proxy, --fanout for bare watches (issue 15; ~20 min)",
    "load": "KeySpace load and apply against a private etcd",
    "peer_writes": "1-key write cost at 100k keys beside the peers",
    "projections": "image, load and cold get with a writer-side transform vs without (issue 23)",
    "profile_reader": "where a get's time goes: step by step and a cProfile",
    "security_cost": "trust checks vs a whole Reader attach (issue 16; seconds)",
    "security_repro": "the issue-16 squat by nobody, end to end (needs root, setpriv)",
    "soak": "the opt-in reliability soak: fault and fuzz tests at large counts",
    "targets_table": "print results.json's targets as one table [FILE]",
    "typed_values": "msgspec Struct-typed gets vs dicts vs py-lmdb (issue 23)",
    "watch_stream": "watch apply throughput: our stream vs the client library's watcher",
    "writer_scale": "the writer at scale vs etcd (issue 11; --smoke in CI)",
}


def run_standalone(name: str, argv: List[str]) -> int:
    """Run bench/scenarios/NAME.py's ``main(argv)``; its exit code (0 for None)."""
    import importlib

    mod = importlib.import_module(f"scenarios.{name}")
    return int(mod.main(argv) or 0)


class Context:
    """What a scenario gets: the configuration, settings, live writer, readers and peers."""

    def __init__(self, cfg: common.Config, settings: common.Settings) -> None:
        self.cfg = cfg
        self.settings = settings
        self.client: Any = None
        self.writer: Optional[common.Child] = None
        self.writer_ready: Dict[str, Any] = {}
        self.image_bytes = 0
        self.reader: Any = None  # default Reader() (per-reader cache on)
        self.reader_cold: Any = None  # Reader(cache_size=0)
        # The same two with implementation="python" when the compiled path is the
        # default (None otherwise: then reader/reader_cold are the Python path).
        self.reader_py: Any = None
        self.reader_cold_py: Any = None
        self.lmdb: Optional[LmdbPeer] = None
        self.dict_peer: Optional[DictPeer] = None
        self.etcd: Optional[EtcdPeer] = None
        self.smd: Optional[SmdPeer] = None
        self.smd_note = ""

    def open_readers(self) -> None:
        from shmkeyspace import Reader

        self.reader = Reader(self.cfg.name, wait=60)
        self.reader_cold = Reader(self.cfg.name, cache_size=0)
        if Reader.implementation != "python":
            self.reader_py = Reader(self.cfg.name, implementation="python")
            self.reader_cold_py = Reader(self.cfg.name, cache_size=0, implementation="python")

    def close_readers(self) -> None:
        for r in (self.reader, self.reader_cold, self.reader_py, self.reader_cold_py):
            if r is not None:
                r.close()
        self.reader = self.reader_cold = self.reader_py = self.reader_cold_py = None
        gc.collect()

    def close(self) -> None:
        self.close_readers()
        if self.smd is not None:
            self.smd.close()
            self.smd = None
        if self.lmdb is not None:
            self.lmdb.close()
            self.lmdb = None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_peers(ctx: Context, need: List[str]) -> None:
    """Fill the peers from the published snapshot (same keys, values, revisions)."""
    from shmkeyspace.snapshot import pack_entry

    entries = ctx.reader.range(b"", None)
    if len(entries) != ctx.cfg.n:
        raise AssertionError(f"snapshot holds {len(entries)} keys, expected {ctx.cfg.n}")
    if "reads" in need or "scaling" in need:
        ctx.lmdb = LmdbPeer()
        ctx.lmdb.fill(
            (
                e.key.encode(),
                pack_entry(e.key.encode(), e.decoded, e.create_revision, e.mod_revision, e.version, e.lease),
            )
            for e in entries
        )
    if "reads" in need:
        ctx.dict_peer = DictPeer((e.key, e.decoded) for e in entries)
        ctx.etcd = EtcdPeer(ctx.client)
        why = smd_available()
        if why is None:
            try:
                ctx.smd = SmdPeer((e.key, e.decoded) for e in entries)
            except Exception as exc:
                ctx.smd_note = f"failed to hold {ctx.cfg.n:,} keys: {type(exc).__name__}: {exc}"
        else:
            ctx.smd_note = why
    del entries
    gc.collect()


def run_config(n: int, vs: int, settings: common.Settings, only: List[str], res: Dict[str, list]) -> None:
    from shmkeyspace.embedded import EtcdServer
    from shmkeyspace.etcd import connect

    prefix = common.config_prefix(n, vs)
    cfg = common.Config(
        n=n,
        value_size=vs,
        prefix=prefix,
        name=f"bench-{os.environ.get('SHMKEYSPACE_BENCH_TAG') or os.getpid()}-{uuid.uuid4().hex[:6]}-{n}x{vs}",
        keys=[common.key_of(prefix, i) for i in range(n)],
    )
    ctx = Context(cfg, settings)
    with EtcdServer(extra_args=common.ETCD_ARGS) as srv:
        cfg.endpoint = srv.endpoint
        ctx.client = connect(srv.endpoint, client="pyetcd")
        try:
            t = common.seed(ctx.client, prefix, n, vs)
            log(f"{n:,} keys × {vs} B: seeded etcd in {t:.1f} s; snapshot {cfg.name}")
            ctx.writer = common.Child("writer", srv.endpoint, prefix, cfg.name, "0.03")
            ctx.writer_ready = ctx.writer.read(900)
            ctx.image_bytes = ctx.writer_ready["image_bytes"]
            log(
                f"writer published {ctx.writer_ready['keys']:,} keys ({ctx.image_bytes / 1e6:.1f} MB image) "
                f"in {ctx.writer_ready['load']['wall'] / 1e9:.2f} s"
            )
            ctx.open_readers()
            build_peers(ctx, only)
            for name in SCENARIOS:
                if name not in only:
                    continue
                t0 = time.perf_counter()
                try:
                    out = {
                        "reads": reads.run,
                        "scaling": scaling.run,
                        "memory": memory.run,
                        "writer": writer_scenario.run,
                        "visibility": visibility.run,
                    }[name](ctx)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:
                    # One failed scenario must not cost the rest of a long run: record it
                    # (the exit status says so) and go on with a fresh pair of Readers.
                    log(f"{n:,} keys × {vs} B: {name} FAILED:\n{traceback.format_exc()}")
                    res["errors"].append(
                        {
                            "keys": n,
                            "value_size": vs,
                            "scenario": name,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    ctx.close_readers()
                    ctx.open_readers()
                    continue
                res[name].extend(out if isinstance(out, list) else [out])
                log(f"{n:,} keys × {vs} B: {name} done in {time.perf_counter() - t0:.1f} s")
        finally:
            ctx.close()
            if ctx.writer is not None:
                ctx.writer.close(30)
            ctx.client.close()
            from shmkeyspace import writerlock

            try:
                writerlock.unlink_all(cfg.name)
            except Exception:
                pass


def versions() -> Dict[str, str]:
    out = {}
    from importlib import metadata

    for dist in ("shmkeyspace", "lmdb", "msgpack", "ormsgpack", "etcd-sdk-python", "shared-memory-dict"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        from shmkeyspace.embedded import find_etcd_binary

        v = subprocess.run(
            [find_etcd_binary(), "--version"], capture_output=True, text=True, timeout=20
        ).stdout
        out["etcd"] = v.split("etcd Version:")[1].split()[0] if "etcd Version:" in v else "?"
    except Exception:
        out["etcd"] = "?"
    return out


def machine() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def ints(s: str) -> List[int]:
    return [int(x.replace("_", "")) for x in s.split(",") if x.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only", default="")
    known, rest = pre.parse_known_args(argv)
    if known.only in STANDALONE:
        return run_standalone(known.only, rest)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keys", type=ints, default=None, help="key counts (default 10000,100000)")
    ap.add_argument("--value-size", type=ints, default=None, help="value sizes in bytes (default 100,1000)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 2,000 keys, few iterations (< 60 s)")
    ap.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios (default all: {','.join(SCENARIOS)}), or one standalone "
        "scenario with its own options: " + "; ".join(f"{k}: {v}" for k, v in STANDALONE.items()),
    )
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results"), help="output directory")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        ap.error(
            f"unknown scenario(s) {', '.join(bad)}: choose from {', '.join(SCENARIOS)} "
            f"(or one of {', '.join(STANDALONE)}, alone)"
        )
    settings = common.smoke_settings() if args.smoke else common.Settings()
    keys = args.keys or ([2000] if args.smoke else [10_000, 100_000])
    sizes = args.value_size or ([100] if args.smoke else [100, 1000])
    if min(keys) < 2 * common.RANGE_LEN:
        ap.error(f"--keys must be at least {2 * common.RANGE_LEN}")

    # SIGTERM/SIGHUP unwind through the finally blocks (children, etcd, shared memory).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    res: Dict[str, Any] = {s: [] for s in SCENARIOS}
    res["errors"] = []
    for n in keys:
        for vs in sizes:
            run_config(n, vs, settings, only, res)
    cmd = "./run bench" + ("" if not sys.argv[1:] else " " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    res["meta"] = {
        "command": cmd,
        "started": started,
        "duration_s": time.perf_counter() - t0,
        "machine": machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions(),
        "unpacker": UNPACKER_NAME,
        "keys": keys,
        "value_sizes": sizes,
        "scenarios": only,
        "smoke": args.smoke,
        "settings": vars(settings),
    }
    res["targets"] = report.compute_targets(res)
    paths = report.write(res, args.out)
    log(f"done in {res['meta']['duration_s']:.0f} s: " + ", ".join(paths.values()))
    sys.stdout.write(report.markdown(res))
    if res["errors"]:
        log(f"{len(res['errors'])} scenario(s) failed: see 'errors' in results.json")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
