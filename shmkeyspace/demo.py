"""``shmkeyspace demo``: the whole system on one host, measured, then cleaned up.

Steps: start an embedded etcd (:class:`~shmkeyspace.embedded.EtcdServer`) in a
temporary directory; seed service-discovery records
``/demo/services/svc-NNNNN/instance-NN`` (JSON: host, port, zone, weight, tags,
version) with 100-put transactions on several threads; start the standalone
writer as a real subprocess (``python -m shmkeyspace writer``); measure what a
private in-process mirror costs (a child that loads every key into a
:class:`~shmkeyspace.keyspace.KeySpace` with the JSON decoder); start reader
processes that hammer random uncached ``get``s; make live updates with ordinary
puts and time, per reader, from the put to the moment that reader sees the new
value; print a plain-text table.

Promises: progress goes to stderr, the result table to stdout; whatever happens
(success, error, Ctrl-C, SIGTERM) the child processes are stopped, the
snapshot's segments unlinked, etcd stopped and the temporary directory
(``shmkeyspace-demo-*`` under ``$TMPDIR``) removed.

Clocks: readers stamp ``time.monotonic()``, which is CLOCK_MONOTONIC, one clock
for every process on a Linux host, so the parent can subtract its own stamps.

Memory: PSS and USS come from ``/proc/PID/smaps_rollup`` (Linux >= 4.14).
A reader's PSS delta includes its share of the shared snapshot pages it touched
(shared pages are divided among the processes mapping them); its USS delta is
what it holds privately. The mirror child's RSS delta is what every worker
would hold if each kept its own copy.

The reader and mirror children are started as ``python -c`` processes that
import only what they need (readers never import grpc), so their memory
figures are those of a lean worker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from .children import ChildError, JsonChild, child_env, memory, percentile, put_many, reap
from .errors import ShmKeyspaceError

DEMO_PREFIX = "/demo/services"
PER_SERVICE = 20
ZONES = ("eu-west-1a", "eu-west-1b", "eu-west-1c", "us-east-1a", "us-east-1b", "ap-south-1a")
TAGS = ("http", "grpc", "canary", "stable", "internal", "public", "v2")
SAMPLE_KEYS = 20_000  # distinct keys each reader cycles through (random order)
BURST = 128  # lookups between checks of the reader's inbox


# -- the data set ---------------------------------------------------------------------


def instance_key(i: int, prefix: str = DEMO_PREFIX) -> str:
    """The key of record ``i`` (computable in any process without a key list)."""
    return f"{prefix}/svc-{i // PER_SERVICE:05d}/instance-{i % PER_SERVICE:02d}"


def instance_record(i: int, weight: int = 100) -> Dict[str, Any]:
    """A realistic service-discovery record for instance ``i`` (about 150 bytes as JSON)."""
    return {
        "host": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        "port": 8000 + i % 1000,
        "zone": ZONES[i % len(ZONES)],
        "weight": weight,
        "tags": [TAGS[i % len(TAGS)], TAGS[(i + 1 + (i // len(TAGS)) % (len(TAGS) - 1)) % len(TAGS)]],
        "version": f"1.{i % 7}.{i % 13}",
        "healthy": i % 97 != 96,
    }


def seed(
    client: Any,
    n: int,
    *,
    prefix: str = DEMO_PREFIX,
    threads: int = 4,
    batch: int = 100,
    progress: Optional["Progress"] = None,
) -> int:
    """Put records 0..n-1 under ``prefix`` in transactions of ``batch`` puts (etcd's
    default limit is 128 operations per transaction); return etcd's revision after."""
    items = (
        (instance_key(i, prefix), json.dumps(instance_record(i), separators=(",", ":"))) for i in range(n)
    )
    put_many(client, items, batch=batch, threads=threads, progress=progress.update if progress else None)
    return etcd_revision(client)


def etcd_revision(client: Any) -> int:
    """etcd's current revision (every response header carries it)."""
    return int(client.get_response(b"\0shmkeyspace-demo").header.revision)


# -- small utilities --------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _delta_mib(n: float) -> str:
    return f"{round(n / (1 << 20), 1) + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, else a line every second."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.t0 = self.last = time.monotonic()
        self.finished = False
        self.tty = sys.stderr.isatty()

    def update(self, n: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.finished or (not force and now - self.last < (0.1 if self.tty else 1.0) and n < self.total):
            return
        self.last = now
        self.finished = n >= self.total
        rate = n / max(now - self.t0, 1e-9)
        msg = f"{self.label}: {n}/{self.total} ({100 * n // max(self.total, 1)}%, {rate:,.0f}/s)"
        if self.tty:
            sys.stderr.write("\r" + msg + ("\n" if n >= self.total else ""))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class DemoError(ShmKeyspaceError):
    """The demo could not run; the message says which step failed."""


# -- children ---------------------------------------------------------------------------


def _child(role: str, args: List[str], cwd: str) -> JsonChild:
    """A demo child (``demo_children.child_main``) in its own session, so a terminal's Ctrl-C reaches only us."""
    code = "import sys; from shmkeyspace.demo_children import child_main; sys.exit(child_main(sys.argv[1:]))"
    return JsonChild([sys.executable, "-c", code, role, *args], role, cwd=cwd, new_session=True)


def run_demo(
    keys: Optional[int] = None,
    readers: Optional[int] = None,
    updates: Optional[int] = None,
    seconds: Optional[float] = None,
    apply_delay_ms: float = 30.0,
    short: bool = False,
    verbose: bool = False,
) -> int:
    """Run the demo (see module doc); returns an exit code. Cleans up on every path."""
    keys = keys or (5_000 if short else 100_000)
    readers = readers or (2 if short else 4)
    updates = updates or (5 if short else 20)
    seconds = seconds or (1.0 if short else 3.0)
    demo = _Demo(keys, readers, updates, seconds, apply_delay_ms, verbose)
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        demo.run()
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        return 130
    except (DemoError, ChildError) as exc:
        demo.show_writer_log()
        print(f"shmkeyspace: error: demo failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        try:
            demo.cleanup()
        finally:
            signal.signal(signal.SIGTERM, old_term)


class _Demo:
    def __init__(
        self, keys: int, readers: int, updates: int, seconds: float, apply_delay_ms: float, verbose: bool
    ) -> None:
        self.keys, self.nreaders, self.nupdates, self.seconds = keys, readers, updates, seconds
        self.apply_delay_ms, self.verbose = apply_delay_ms, verbose
        self.name = f"demo-{os.getpid()}"
        self.tmp = tempfile.mkdtemp(prefix="shmkeyspace-demo-")
        self.etcd: Any = None
        self.client: Any = None
        self.writer: Optional[subprocess.Popen] = None
        self.writer_log = os.path.join(self.tmp, "writer.log")
        self.children: List[JsonChild] = []

    # -- steps ------------------------------------------------------------------------
    def run(self) -> None:
        t_all = time.monotonic()
        from .embedded import EtcdServer
        from .etcd import connect

        say(
            f"shmkeyspace demo: {self.keys} keys, {self.nreaders} readers, {self.nupdates} updates "
            f"(temporary files in {self.tmp})"
        )
        t = time.monotonic()
        os.makedirs(os.path.join(self.tmp, "etcd"))
        self.etcd = EtcdServer(data_dir=os.path.join(self.tmp, "etcd"))
        self.etcd.start()
        self.client = connect(self.etcd.endpoint)
        say(f"etcd {self.etcd.endpoint} started in {time.monotonic() - t:.1f}s (pid {self.etcd.proc.pid})")

        t = time.monotonic()
        prog = Progress("seeding etcd", self.keys)
        seeded_rev = seed(self.client, self.keys, progress=prog)
        prog.update(self.keys, force=True)
        t_seed = time.monotonic() - t
        say(f"seeded {self.keys} keys under {DEMO_PREFIX}/ in {t_seed:.1f}s; etcd revision {seeded_rev}")

        t_pub = self.start_writer(seeded_rev)
        mirror = self.measure_mirror()
        stats = self.run_readers()

        from .reader import Reader

        with Reader(self.name) as r:
            h = r.health()
        lat = [x for u in stats["latencies"] for x in u]
        rd = stats["done"]
        mem0 = stats["mem0"]
        misses = sum(d["misses"] for d in rd)
        retries = sum(d["retries"] for d in rd)
        rows = [
            ("keys", f"{h.keys}"),
            ("revision", f"{h.revision}"),
            ("seeding", f"{t_seed:.1f} s ({self.keys / max(t_seed, 1e-9):,.0f} keys/s)"),
            ("writer first snapshot", f"{t_pub:.1f} s after spawn"),
            ("snapshot size", f"{mib(h.bytes)} (shared: one copy per host)"),
            (
                "shm segment",
                "{} of /dev/shm (a {} file: {} buffers, room to grow)".format(
                    *self.segment_bytes(h.generation)
                ),
            ),
            ("writer publications", f"{h.seq // 2}"),
        ]
        wmem = memory(self.writer.pid) if self.writer is not None else {}
        if wmem:
            rows.append(
                ("writer heap", f"{mib(wmem['anon'])} (anonymous memory: the image it updates, grpc)")
            )
        total_rate = 0.0
        for d in sorted(rd, key=lambda d: d["idx"]):
            m = stats["marks"][d["idx"]]
            rate = m["lookups"] / max(m["seconds"], 1e-9)
            total_rate += rate
            rows.append((f"reader {d['idx'] + 1} lookups/s", f"{rate:,.0f}"))
        rows.append(("all readers lookups/s", f"{total_rate:,.0f}"))
        rows.append(
            (
                "update->visible p50/p99/max",
                f"{percentile(lat, 50) * 1e3:.1f} / {percentile(lat, 99) * 1e3:.1f} / {max(lat) * 1e3:.1f} ms",
            )
        )
        if all(d["mem"] and mem0[d["idx"]] for d in rd):
            pss = statistics.mean(d["mem"]["pss"] - mem0[d["idx"]]["pss"] for d in rd)
            uss = statistics.mean(d["mem"]["uss"] - mem0[d["idx"]]["uss"] for d in rd)
            rows.append(("reader memory PSS/USS", f"{_delta_mib(pss)} / {_delta_mib(uss)} MiB per reader"))
        else:
            rows.append(("reader memory PSS/USS", "n/a (no /proc/self/smaps_rollup)"))
        if mirror.get("mem0") and mirror.get("mem1"):
            grow = mirror["mem1"]["rss"] - mirror["mem0"]["rss"]
            rows.append(("in-process mirror RSS", f"{_delta_mib(grow)} MiB per process"))
        else:
            rows.append(("in-process mirror RSS", "n/a (no /proc/self/smaps_rollup)"))
        rows.append(("total time", f"{time.monotonic() - t_all:.1f} s"))
        notes = [
            f"lookups: uncached random gets over {min(self.keys, SAMPLE_KEYS)} keys per reader "
            f"({misses} misses, {retries} seqlock retries); {self.nreaders} readers share "
            f"{os.cpu_count()} cores with the writer, etcd and this demo.",
            f"update->visible: from just before each put to a reader seeing the new value "
            f"({self.nupdates} updates x {self.nreaders} readers); the writer batches watch "
            f"events for {self.apply_delay_ms:g} ms (--apply-delay).",
            "reader memory: growth from before attaching to after reading; PSS includes the "
            "reader's share of the snapshot pages it touched, USS is private memory. Per host: "
            "one writer and one segment, plus each reader's USS.",
            f"in-process mirror: a KeySpace (raw and json-decoded values) of all "
            f"{mirror.get('keys', '?')} keys, what every worker would hold without shmkeyspace.",
        ]
        self.print_table(rows, notes)

    def start_writer(self, seeded_rev: int) -> float:
        from .errors import SegmentNotFoundError
        from .reader import Reader

        cmd = [
            sys.executable,
            "-m",
            "shmkeyspace",
            "writer",
            "--endpoints",
            self.etcd.endpoint,
            "--prefix",
            DEMO_PREFIX,
            "--name",
            self.name,
            "--decoder",
            "json",
            "--apply-delay",
            f"{self.apply_delay_ms:g}",
            "--unlink-on-exit",
            "--log-level",
            "info",
        ]
        say("starting the writer: " + " ".join(cmd[1:]))
        logf = None if self.verbose else open(self.writer_log, "wb")
        t = time.monotonic()
        self.writer = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            env=child_env(),
            cwd=self.tmp,
        )
        if logf is not None:
            logf.close()
        deadline = t + 300
        while True:
            if self.writer.poll() is not None:
                raise DemoError(f"the writer exited with {self.writer.returncode} before publishing")
            try:
                with Reader(self.name) as r:
                    if r.revision >= seeded_rev and r.health().writer_pid == self.writer.pid:
                        break
            except SegmentNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise DemoError("the writer published nothing in 300 s")
            time.sleep(0.05)
        t_pub = time.monotonic() - t
        say(f"writer (pid {self.writer.pid}) published {self.keys} keys {t_pub:.1f}s after spawn")
        return t_pub

    def measure_mirror(self) -> Dict[str, Any]:
        say("measuring a private in-process mirror for comparison ...")
        c = _child("mirror", [self.etcd.endpoint, DEMO_PREFIX], self.tmp)
        self.children.append(c)
        try:
            m = c.expect("mirror", 300)
        finally:
            c.close()
        return m

    def run_readers(self) -> Dict[str, Any]:
        seed_ = random.randrange(1 << 30)
        say(f"starting {self.nreaders} reader processes ...")
        rs = [
            _child("reader", [self.name, str(i), str(self.keys), str(seed_)], self.tmp)
            for i in range(self.nreaders)
        ]
        self.children.extend(rs)
        mem0 = {}
        for i, c in enumerate(rs):
            mem0[i] = c.expect("ready", 120)["mem0"]
        for c in rs:
            c.send("go")
        say(f"readers hammering random gets for {self.seconds:g}s ...")
        time.sleep(self.seconds)
        for c in rs:
            c.send("mark")
        marks = {i: c.expect("mark", 60) for i, c in enumerate(rs)}
        for i in sorted(marks):
            m = marks[i]
            say(
                f"  reader {i + 1} (pid {rs[i].proc.pid}): {m['lookups'] / max(m['seconds'], 1e-9):,.0f} lookups/s"
            )

        rng = random.Random(seed_)
        latencies: List[List[float]] = []
        say(f"making {self.nupdates} live updates (etcd puts) while the readers keep reading ...")
        for u in range(self.nupdates):
            i = rng.randrange(self.keys)
            key, weight = instance_key(i), 1000 + u
            for c in rs:
                c.send("expect", u, key, weight)
            time.sleep(0.02)  # let every reader register the expectation before the put
            t0 = time.monotonic()
            resp = self.client.put(key, json.dumps(instance_record(i, weight), separators=(",", ":")))
            rev = int(resp.header.revision)
            seen = [c.expect("seen", 30) for c in rs]
            if any(s["update"] != u for s in seen):
                raise DemoError(f"update {u}: a reader reported another update")
            lat = [s["t"] - t0 for s in seen]
            latencies.append(lat)
            say(
                f"  update {u + 1:>2}/{self.nupdates}: put {key} weight={weight} -> revision {rev}; "
                f"seen by {len(seen)}/{len(rs)} readers after "
                + " ".join(f"{x * 1e3:.1f}" for x in lat)
                + " ms"
            )
            time.sleep(0.05)
        for c in rs:
            c.send("stop")
        done = [c.expect("done", 60) for c in rs]
        pids = {i: c.proc.pid for i, c in enumerate(rs)}
        for c in rs:
            c.close()
        return {"mem0": mem0, "marks": marks, "latencies": latencies, "done": done, "pids": pids}

    # -- output and cleanup ----------------------------------------------------------------
    def print_table(self, rows: List[Tuple[str, str]], notes: List[str]) -> None:
        import textwrap

        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        out = ["", "shmkeyspace demo results", line]
        out += [f"{k:<{width}}  {v}" for k, v in rows]
        out.append(line)
        for n in notes:
            out += textwrap.wrap(n, 78, initial_indent="* ", subsequent_indent="  ", break_on_hyphens=False)
        sys.stdout.write("\n".join(out) + "\n")
        sys.stdout.flush()

    def segment_bytes(self, gen: int) -> Tuple[str, str, int]:
        """(/dev/shm the data segment holds, its file size, as MiB text; its buffer count)."""
        from . import segment

        try:
            st = os.stat(segment.shm_path(segment.data_name(self.name, gen)))
            view = segment.DataView(self.name, gen, 0, owner_uid=st.st_uid)
        except (OSError, ShmKeyspaceError):
            return mib(0), mib(0), 0
        buffers = view.buffers  # 3 with the writer's default view grace
        view.close()
        return mib(st.st_blocks * 512), mib(st.st_size), buffers

    def show_writer_log(self) -> None:
        try:
            with open(self.writer_log, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
        except OSError:
            return
        if tail.strip():
            say("--- writer log (tail) ---\n" + tail.rstrip() + "\n---")

    def cleanup(self) -> None:
        """Stop everything this demo started. Safe to call at any point, more than once."""
        from . import writerlock

        for c in self.children:
            try:
                c.close(timeout=5)
            except Exception:
                pass
        self.children = []
        if self.writer is not None:
            reap(self.writer, signal.SIGTERM, timeout=10)  # clean stop: it unlinks (--unlink-on-exit)
            self.writer = None
        try:
            writerlock.unlink_all(self.name)  # in case the writer could not
        except Exception:
            pass
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        shutil.rmtree(self.tmp, ignore_errors=True)
