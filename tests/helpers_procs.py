"""Small helpers for tests that run writers and readers as real child processes.

The generic parts (child environment and reaping, memory) live in
:mod:`shmkeyspace.children`, shared with the demo and the benchmarks; the names
here stay for the tests. Owns nothing in the library: it spawns Python children
(a script given as text, run with the repo and ``tests/`` importable), stops
them, waits for conditions, reads per-process facts from ``/proc`` (fd count,
private RSS, shm mappings), scales test sizes between CI and the soak, and appends the counts a test wants
reported to ``$SHMKEYSPACE_SOAK_REPORT`` (read by ``bench/scenarios/soak.py``).

Children are plain ``subprocess.Popen`` objects so a test can SIGKILL, SIGSTOP
or SIGCONT them by pid; every spawn should be paired with :func:`stop` in a
``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from shmkeyspace import children, segment

__all__ = [
    "TESTS_DIR",
    "ROOT",
    "PYTHON",
    "soak",
    "scaled",
    "report_counts",
    "child_env",
    "spawn",
    "stop",
    "wait_until",
    "fd_count",
    "etcd_reachable",
    "private_rss",
    "shm_mappings",
    "shm_files",
    "ProgressFile",
    "read_progress",
    "proc_state",
    "last_json",
    "SCHEDULE_PUBLISHER",
    "WRITER",
]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
PYTHON = sys.executable


def soak() -> bool:
    """True when the long, opt-in sizes were asked for (SHMKEYSPACE_SOAK=1)."""
    return os.environ.get("SHMKEYSPACE_SOAK", "") not in ("", "0")


def scaled(ci: int, soak_value: int, env: Optional[str] = None) -> int:
    """``ci`` normally, ``soak_value`` under the soak; ``$env`` overrides both."""
    if env and os.environ.get(env):
        return int(os.environ[env])
    return soak_value if soak() else ci


def report_counts(test: str, **counts) -> None:
    """Append ``counts`` for ``test`` to $SHMKEYSPACE_SOAK_REPORT (JSON lines), if set."""
    path = os.environ.get("SHMKEYSPACE_SOAK_REPORT")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, **counts}) + "\n")


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a child: repo and tests/ importable, unbuffered output."""
    return children.child_env([TESTS_DIR], extra)


def spawn(
    code: str, *args: str, stdout=subprocess.PIPE, stderr=subprocess.PIPE, prefix: Sequence[str] = (), **kw
) -> subprocess.Popen:
    """Run ``python -c code args...`` (optionally behind ``prefix``, e.g. unshare)."""
    return subprocess.Popen(
        [*prefix, PYTHON, "-c", code, *args],
        env=child_env(kw.pop("env", None)),
        stdout=stdout,
        stderr=stderr,
        stdin=kw.pop("stdin", subprocess.DEVNULL),
        text=True,
        **kw,
    )


def stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
    """Stop ``proc`` (``sig``, then SIGKILL after ``timeout``); returns its exit code."""
    return children.reap(proc, sig, timeout)


def private_rss(pid="self") -> int:
    """Resident bytes not backed by a file or shm (RssAnon)."""
    return children.memory(pid, smaps=False)["anon"]


def shm_files(name: str) -> List[str]:
    """The /dev/shm files of snapshot ``name`` (control, then data generations in order)."""
    return [shm[1:] for shm, _gen in segment.segment_files(name)]


class ProgressFile:
    """A child's live counters, for its parent to poll: one JSON object rewritten in place.

    The child calls ``update(**fields)`` (one pwrite; cheap enough per operation);
    the parent calls :func:`read_progress`.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.fields: Dict[str, object] = {}

    def update(self, **fields) -> None:
        self.fields.update(fields)
        data = json.dumps(self.fields).encode().ljust(1024)  # fixed size: no torn tail to parse
        os.pwrite(self.fd, data, 0)


def read_progress(path: str) -> dict:
    """The latest fields a child wrote with :class:`ProgressFile` ({} if none yet)."""
    try:
        with open(path, "rb") as f:
            data = f.read().strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}  # not created yet, or read while being rewritten: poll again


def proc_state(pid: int) -> str:
    """The one-letter state of ``pid`` (R, S, T when stopped, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def last_json(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object (a child's result)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError(f"no JSON result in child output:\n{text[-3000:]}")


# -- ready-made child scripts ------------------------------------------------------

#: A low-level publisher of the deterministic schedule of ``torture.py`` that
#: continues from the revision currently published (so a successor of a killed
#: publisher keeps revisions increasing). argv: NAME BIG_KIB.
SCHEDULE_PUBLISHER = r"""
import sys, torture
from shmkeyspace import Reader
from shmkeyspace.errors import ShmKeyspaceError
name, big = sys.argv[1], int(sys.argv[2])
try:
    with Reader(name, cache_size=0) as r:
        start = r.revision + 1
except ShmKeyspaceError:
    start = 1
torture.publish_forever(name, big, 1e9, start)
"""

#: A real Writer (etcd -> shm) that exits cleanly on SIGTERM, like a daemon: the
#: signal only sets an event; Writer.stop() runs on the main thread, outside any
#: publication. argv: NAME PREFIX ENDPOINTS DECODER_SPEC. Prints "ready GEN"
#: once the first snapshot is published and "stopped PUBLICATIONS" at exit.
WRITER = r"""
import logging, signal, sys, threading
from shmkeyspace import Writer
from shmkeyspace.decoders import resolve
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
name, prefix, endpoints, dec = sys.argv[1:5]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
w = Writer(name, prefix, endpoints=endpoints, decoder=resolve(dec), apply_delay=0.005,
           heartbeat_interval=0.1)
w.start()
print("ready", w.publisher.gen, flush=True)
while not stop.wait(0.2):
    pass
w.stop()
print("stopped", w.publications, flush=True)
"""


# -- /proc probes and waiting (test-only; moved from the package) ----------------------

Pid = Union[int, str]


def fd_count(pid: Pid = "self") -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def shm_mappings(pid: Pid = "self", needle: str = "/dev/shm/shmks.") -> List[str]:
    """Lines of ``/proc/PID/maps`` that map shmkeyspace segments."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.rstrip("\n") for line in f if needle in line]


# -- statistics ------------------------------------------------------------------------


def etcd_reachable(client: Any, timeout: float = 60.0) -> bool:
    """Wait until ``client`` answers a read; True iff it did within ``timeout``.

    After etcd restarts, an existing client's gRPC channel reconnects on its own
    schedule (backoff), and calls made before that fail fast with UNAVAILABLE
    although etcd is healthy: wait on this before using such a client.
    """

    def answers() -> bool:
        try:
            client.get_range_response(b"\0probe", b"\0probf", limit=1)
            return True
        except Exception:  # UNAVAILABLE, the failover client's "no endpoint", ...
            return False

    return wait_until(answers, timeout, 0.1)


# -- waiting ---------------------------------------------------------------------------


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; True iff it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
