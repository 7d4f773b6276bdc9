"""The demo's child processes: readers that hammer gets, and a private-mirror stand-in.

Owns what runs inside the children ``shmkeyspace demo`` starts (demo.py spawns
them with ``child_main`` and talks JSON lines with them). Promises: a child
reports every failure as one JSON ``error`` line and a non-zero exit, never a
silent death; an interrupted child exits 130.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .demo import BURST, SAMPLE_KEYS, DemoError, instance_key, memory


def _emit(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def child_main(argv: List[str]) -> int:
    """Entry point of the demo's child processes (not a public interface)."""
    role = argv[0]
    try:
        if role == "reader":
            return _reader_child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        if role == "mirror":
            return _mirror_child(argv[1], argv[2])
        raise DemoError(f"unknown role {role!r}")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        _emit(error=f"{type(exc).__name__}: {exc}")
        return 1


def _reader_child(name: str, idx: int, nkeys: int, seed_: int) -> int:
    """Hammer random gets; on request, report when a given key shows a given weight."""
    import collections
    import gc
    from itertools import cycle

    from .reader import Reader

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    rng = random.Random(seed_ * 1000 + idx)
    sample = [instance_key(rng.randrange(nkeys)) for _ in range(min(nkeys, SAMPLE_KEYS))]
    chunks = [sample[j : j + BURST] for j in range(0, len(sample), BURST)]
    inbox: "collections.deque[List[str]]" = collections.deque()

    def read_stdin() -> None:
        for line in sys.stdin:
            inbox.append(line.split())
        inbox.append(["eof"])

    threading.Thread(target=read_stdin, daemon=True).start()
    gc.collect()
    mem0 = memory()
    # cache_size=0: every lookup goes to shared memory (the numbers are not cache hits).
    r = Reader(name, wait=30, cache_size=0)
    _emit(kind="ready", idx=idx, revision=r.revision, mem0=mem0)

    def next_command(block: bool) -> Optional[List[str]]:
        while True:
            if inbox:
                return inbox.popleft()
            if not block:
                return None
            time.sleep(0.001)

    cmd = next_command(True)
    if cmd is None or cmd[0] != "go":
        return 0
    get = r.get
    pending: Dict[int, Tuple[str, int]] = {}
    n = misses = 0
    t_go = time.monotonic()
    mark: Optional[Tuple[int, float]] = None
    for chunk in cycle(chunks):
        for k in chunk:
            if get(k) is None:
                misses += 1
        n += len(chunk)
        if pending:
            now = time.monotonic()
            for u, (key, weight) in list(pending.items()):
                e = get(key)
                if e is not None and e.decoded.get("weight") == weight:
                    del pending[u]
                    _emit(kind="seen", idx=idx, update=u, t=now, revision=e.mod_revision)
        while inbox:
            cmd = inbox.popleft()
            if cmd[0] == "expect":
                pending[int(cmd[1])] = (cmd[2], int(cmd[3]))
            elif cmd[0] == "mark":
                mark = (n, time.monotonic() - t_go)
                _emit(kind="mark", idx=idx, lookups=n, seconds=mark[1], misses=misses)
            elif cmd[0] in ("stop", "eof"):
                elapsed = time.monotonic() - t_go
                _emit(
                    kind="done",
                    idx=idx,
                    lookups=n,
                    seconds=elapsed,
                    misses=misses,
                    mem=memory(),
                    retries=r.retries,
                )
                r.close()
                return 0
    return 0


def _mirror_child(endpoint: str, prefix: str) -> int:
    """Load every key under ``prefix`` into an in-process KeySpace (JSON-decoded); report RSS growth."""
    import gc

    from . import decoders
    from .etcd import connect
    from .keyspace import KeySpace

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    c = connect(endpoint)
    gc.collect()
    m0 = memory()
    mirror = KeySpace(prefix, decoders.json)
    mirror.load(c)
    gc.collect()
    m1 = memory()
    _emit(kind="mirror", keys=len(mirror.key_values), mem0=m0, mem1=m1)
    c.close()
    return 0


# -- the demo ------------------------------------------------------------------------------
