"""Child processes of the benchmark: ``python worker.py MODE ARGS...``.

Every mode prints JSON lines on stdout (one per event or command reply) and
treats end of stdin as "quit", so a dying parent never leaves workers behind.

Modes:
  writer ENDPOINT PREFIX NAME APPLY_DELAY   a shmkeyspace Writer reporting its on_publish stats
  getloop KIND TARGET PREFIX N SEED         random gets for a given time after "go SECONDS"
  hold NAME CACHE_SIZE PREFIX N             a Reader that has touched every key, then idles
  mirror NAME                               an in-process dict of every decoded value, then idles
  idle                                      the same imports, holding nothing (memory baseline)
  loader ENDPOINT PREFIX RATE MAX_S MAX_N   background puts after "go" until "stop"/limits
  load ENDPOINT PREFIX                      time KeySpace.load of the prefix, then exit
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path[:0] = [
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

from scenarios import common  # noqa: E402
from shmkeyspace.children import memory  # noqa: E402


def emit(**msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def wait_eof() -> None:
    for _ in sys.stdin:
        pass


def rss() -> dict:
    """RSS and its parts (anon: the heap; shmem: shared memory touched), PSS and USS."""
    return memory()


# -- writer ----------------------------------------------------------------------------


def mode_writer(endpoint: str, prefix: str, name: str, apply_delay: str) -> None:
    from shmkeyspace import Writer, decoders
    from shmkeyspace.etcd import connect

    client = connect(endpoint, client="pyetcd")
    records: list = []

    def on_publish(st) -> None:
        # The fields bench/scenarios/writer.py and visibility.py summarise.
        records.append(
            {
                "changed": st.changed,
                "keys": st.keys,
                "image_bytes": st.image_bytes,
                "revision": st.revision,
                "t_published": st.t_published,
                "cpu_total": st.cpu_apply + st.cpu_parts + st.cpu_publish,
                "wall_total": st.wall_total,
                "cpu_apply": st.cpu_apply,
                "wall_apply": st.wall_apply,
                "cpu_parts": st.cpu_parts,
                "wall_parts": st.wall_parts,
                "cpu_publish": st.cpu_publish,
                "wall_publish": st.wall_publish,
                "cpu_ks_apply": st.cpu_batch,
                "wall_ks_apply": st.wall_batch,
            }
        )

    w = Writer(
        name,
        prefix,
        client=client,
        decoder=decoders.json,
        apply_delay=float(apply_delay),
        unlink_on_exit=True,
        on_publish=on_publish,
        # the CLI's variable: a run can measure the writer without a view grace (2 buffers)
        view_grace=float(os.environ.get("SHMKEYSPACE_VIEW_GRACE", "0.1")),
    )
    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
    w.start()
    load = {"cpu": time.thread_time_ns() - c0, "wall": time.perf_counter_ns() - w0}
    load["publish"] = records[-1] if records else None
    last = records[-1] if records else {}
    emit(
        event="ready",
        pid=os.getpid(),
        load=load,
        mem=rss(),
        keys=last.get("keys", 0),
        image_bytes=last.get("image_bytes", 0),
    )
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "stats":
                n = len(records)  # appends race with this: take a prefix, keep the rest
                recs = records[:n]
                del records[:n]
                emit(records=recs, mem=rss(), publications=w.publications, failures=w.publish_failures)
            elif cmd[0] == "delay":
                w.apply_delay = float(cmd[1])
                emit(ok=True)
            elif cmd[0] == "grace":
                w.publisher.view_grace = float(cmd[1])
                emit(ok=True)
            elif cmd[0] == "shm":
                # /dev/shm bytes the data segments hold (reserved as used: st_blocks)
                from shmkeyspace import segment as seg

                held = sum(os.stat(seg.shm_path(f)).st_blocks * 512 for f, g in seg.segment_files(name) if g)
                emit(bytes=held, buffers=w.publisher.buffers)
            elif cmd[0] == "clock":
                emit(perf_counter_ns=time.perf_counter_ns())
            else:
                emit(error=f"unknown command {cmd!r}")
    finally:
        w.stop()


# -- readers ---------------------------------------------------------------------------


def mode_getloop(kind: str, target: str, prefix: str, n: str, seed: str) -> None:
    import random

    n = int(n)
    r = random.Random(seed)
    keys = [common.key_of(prefix, r.randrange(n)) for _ in range(min(50_000, 5 * n))]
    if kind == "reader":
        from shmkeyspace import Reader

        reader = Reader(target, cache_size=0)  # random gets: measure lookups, not the cache
        get = reader.get
    elif kind == "lmdb":
        from scenarios.peers import LmdbPeer

        peer = LmdbPeer(target, readonly=True)
        get = peer.get
        keys = [k.encode() for k in keys]
    else:
        raise SystemExit(f"unknown kind {kind}")
    for k in keys[:1000]:  # warm up (and prove the keys exist)
        if get(k) is None:
            emit(error=f"{kind}: key {k!r} missing")
            return
    emit(event="ready", pid=os.getpid())
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "go":
            continue
        seconds = float(cmd[1])
        chunks = [keys[i : i + 1000] for i in range(0, len(keys), 1000)]
        ops = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        c = 0
        while True:
            for k in chunks[c]:
                get(k)
            ops += len(chunks[c])
            c = (c + 1) % len(chunks)
            if time.perf_counter() >= end:
                break
        emit(ops=ops, seconds=time.perf_counter() - t0)


def mode_hold(name: str, cache_size: str, prefix: str, n: str) -> None:
    from shmkeyspace import Reader

    reader = Reader(name, cache_size=int(cache_size))
    get = reader.get
    missing = 0
    for i in range(int(n)):  # touch every entry (and the whole hash table) once
        if get(common.key_of(prefix, i)) is None:
            missing += 1
    emit(event="ready", pid=os.getpid(), missing=missing)
    wait_eof()
    reader.close()


def mode_mirror(name: str) -> None:
    import gc

    from shmkeyspace import Reader

    with Reader(name) as reader:
        mirror = {e.key: e.decoded for e in reader.range(b"", None)}
    gc.collect()
    emit(event="ready", pid=os.getpid(), keys=len(mirror))
    wait_eof()
    del mirror


def mode_idle() -> None:
    from shmkeyspace import Reader  # noqa: F401 - same imports as hold/mirror

    emit(event="ready", pid=os.getpid())
    wait_eof()


# -- etcd load ----------------------------------------------------------------------------


def mode_loader(endpoint: str, prefix: str, rate: str, max_s: str, max_n: str) -> None:
    from shmkeyspace.etcd import connect

    client = connect(endpoint, client="pyetcd")
    rate, max_s, max_n = float(rate), float(max_s), int(max_n)
    stop = threading.Event()
    emit(event="ready", pid=os.getpid())
    for line in sys.stdin:
        if line.strip() == "go":
            break
    else:
        return

    def watch_stdin():
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    value = common.make_value(0, 100)
    t0 = time.perf_counter()
    i = 0
    while not stop.is_set() and i < max_n:
        now = time.perf_counter()
        if now - t0 >= max_s:
            break
        due = t0 + i / rate
        if due > now:
            time.sleep(due - now)
        client.put(f"{prefix}/zzload/{i % 1000:04d}", value)
        i += 1
    elapsed = time.perf_counter() - t0
    emit(puts=i, seconds=elapsed, rate=i / elapsed if elapsed else 0.0)
    client.close()


def mode_load(endpoint: str, prefix: str) -> None:
    from shmkeyspace import KeySpace, decoders
    from shmkeyspace.etcd import connect

    client = connect(endpoint, client="pyetcd")
    ks = KeySpace(prefix, decoders.json)
    c0, w0 = time.process_time(), time.perf_counter()
    ks.load(client)
    emit(keys=len(ks.key_values), wall=time.perf_counter() - w0, cpu=time.process_time() - c0, mem=rss())
    client.close()


MODES = {
    "writer": mode_writer,
    "getloop": mode_getloop,
    "hold": mode_hold,
    "mirror": mode_mirror,
    "idle": mode_idle,
    "loader": mode_loader,
    "load": mode_load,
}

if __name__ == "__main__":
    mode = sys.argv[1]
    try:
        MODES[mode](*sys.argv[2:])
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    except Exception as exc:
        import traceback

        traceback.print_exc()
        try:
            emit(error=f"{type(exc).__name__}: {exc}")
        except Exception:
            pass
        sys.exit(1)
