"""What the demo runs on: child processes, their memory, percentiles, seeding etcd.

``shmkeyspace demo`` (demo.py) starts readers and a writer as children and
reports their memory and latencies; the benchmarks and the tests reuse these
helpers rather than carry copies. Owns:

* child processes: :func:`child_env` (this very ``shmkeyspace`` importable,
  unbuffered output), :func:`reap` (stop and collect one child, whatever state
  it is in), :class:`JsonChild` (a child speaking JSON lines on stdout);
* memory probes from ``/proc``: :func:`memory` (rss/pss/uss/anon/file/shmem of a
  process);
* statistics: :func:`percentile` (nearest rank), :func:`median`;
* seeding etcd: :func:`put_many` (transactions of puts, optionally from threads);
* :func:`writer_command` (the command line of a writer child: bench and tests).

The tests' own helpers (fd counts, shm mappings, waiting on a condition) are in
``tests/helpers_procs.py``.

Segment names (which snapshots and generations exist) are the layout's business:
see :func:`shmkeyspace.segment.snapshot_names` and :func:`~shmkeyspace.segment.segment_files`.

Promises: nothing here is imported by a reader, and no etcd client or grpc is
imported at module level (``put_many`` takes a client the caller connected).
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import ShmKeyspaceError

#: The directory holding the ``shmkeyspace`` package (the repository root in a checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Pid = Union[int, str]


class ChildError(ShmKeyspaceError, RuntimeError):
    """A helper child process failed, exited early, or did not answer in time."""


# -- child processes -------------------------------------------------------------------


def child_env(extra_paths: Sequence[str] = (), extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for a child Python: this ``shmkeyspace`` (then ``extra_paths``,
    then the inherited ``PYTHONPATH``) importable, unbuffered output, plus ``extra``."""
    env = dict(os.environ)
    path = [PACKAGE_PARENT, *extra_paths, *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def reap(
    proc: Optional[subprocess.Popen],
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    grace: float = 0.0,
) -> Optional[int]:
    """Stop ``proc`` and collect it; returns its exit code (None for no process).

    Waits ``grace`` seconds for it to exit on its own (e.g. after its stdin was
    closed), then sends SIGCONT (a stopped child cannot act on a signal) and
    ``sig``, then SIGKILL after ``timeout``. Closes its pipes.
    """
    if proc is None:
        return None
    try:
        if grace > 0:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            except ProcessLookupError:
                proc.wait(10)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
    return proc.returncode


class JsonChild:
    """A child process that reads commands on stdin and writes one JSON object per line.

    A thread drains stdout into a queue (lines that are not JSON objects are
    skipped), so a chatty child never blocks on a full pipe. A message with an
    ``"error"`` field, end of output, or silence past the timeout raise
    :class:`ChildError` naming the child. stderr is inherited. Pair with
    :meth:`close`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        label: str = "",
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        new_session: bool = False,
    ) -> None:
        self.label = label or os.path.basename(argv[0])
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            bufsize=1,
            cwd=cwd,
            start_new_session=new_session,
            env=env if env is not None else child_env(),
        )
        self.messages: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name=f"child-{self.label}-stdout").start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        self.messages.put(json.loads(line))
                    except ValueError:
                        pass
        except (OSError, ValueError):  # stdout closed under us by close()
            pass
        self.messages.put({"eof": True})

    def send(self, *words: Any) -> None:
        """Write ``words`` as one line to the child's stdin (ignored once it has gone)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(" ".join(map(str, words)) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def read(self, timeout: float = 300.0) -> Dict[str, Any]:
        """The next message."""
        try:
            m = self.messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise ChildError(f"{self.label} (pid {self.pid}) sent nothing within {timeout:g}s") from None
        if m.get("eof"):
            self.messages.put(m)  # every later read fails the same way
            raise ChildError(f"{self.label} (pid {self.pid}) exited with {self.proc.wait()}")
        if m.get("error"):
            raise ChildError(f"{self.label} (pid {self.pid}) failed: {m['error']}")
        return m

    def expect(self, kind: str, timeout: float = 300.0) -> Dict[str, Any]:
        """The next message whose ``kind`` is ``kind`` (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.read(deadline - time.monotonic())
            except ChildError as exc:
                raise ChildError(f"{exc} (waiting for {kind!r})") from None
            if m.get("kind") == kind:
                return m

    def ask(self, *words: Any, timeout: float = 300.0) -> Dict[str, Any]:
        """:meth:`send` then :meth:`read`."""
        self.send(*words)
        return self.read(timeout)

    def close(self, timeout: float = 10.0) -> Optional[int]:
        """Close its stdin (a well-behaved child exits at EOF), then :func:`reap` it."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        return reap(self.proc, timeout=timeout, grace=timeout)


def close_all(children: Iterable[JsonChild], timeout: float = 10.0) -> None:
    """Close every child; the first failure does not leave the others running."""
    for c in children:
        try:
            c.close(timeout)
        except Exception:
            if c.proc.poll() is None:
                c.proc.kill()


# -- memory probes ---------------------------------------------------------------------


def memory(pid: Pid = "self", smaps: bool = True) -> Dict[str, int]:
    """Memory of a process in bytes, from ``/proc`` ({} if it is gone).

    ``rss``, and its parts ``anon`` (private heap: not backed by a file or shm),
    ``file`` and ``shmem`` from ``/proc/PID/status`` (cheap); with ``smaps``
    also ``pss`` (shared pages divided among the processes mapping them) and
    ``uss`` (private pages) from ``/proc/PID/smaps_rollup`` (Linux >= 4.14; it
    walks every mapping, ~0.1-1 ms).
    """
    names = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in names:
                    out[names[k]] = int(v.split()[0]) * 1024
        if smaps:
            rollup: Dict[str, int] = {}
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                        rollup[parts[0][:-1]] = int(parts[1]) * 1024
            out["pss"] = rollup.get("Pss", 0)
            out["uss"] = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    except OSError:
        return {}
    return out


def writer_command(
    endpoint: str, prefix: str, name: str, *extra: str, python: str = sys.executable
) -> List[str]:
    """``python -m shmkeyspace writer`` of snapshot ``name`` mirroring ``prefix`` from ``endpoint``, then ``extra``."""
    return [
        python,
        "-m",
        "shmkeyspace",
        "writer",
        "--endpoints",
        endpoint,
        "--prefix",
        prefix,
        "--name",
        name,
        *extra,
    ]


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return float(s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))])


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


# -- etcd seeding -------------------------------------------------------------------------


def put_many(
    client: Any,
    items: Iterable[Tuple[Union[str, bytes], Union[str, bytes]]],
    batch: int = 100,
    threads: int = 1,
    progress: Optional[Callable[[int], None]] = None,
) -> int:
    """Put ``(key, value)`` pairs in transactions of ``batch`` puts; returns how many.

    etcd's default limit is 128 operations per transaction (``--max-txn-ops``).
    With ``threads`` > 1 the transactions go out concurrently on the one
    (thread-safe) client, in no particular order: use distinct keys.
    ``progress(n)`` gets the running count after each transaction.
    """
    tx = client.transactions
    lock = threading.Lock()
    done = [0]

    def put_batch(chunk: List[Tuple[Any, Any]]) -> None:
        client.transaction(compare=[], success=[tx.put(k, v) for k, v in chunk], failure=[])
        with lock:
            done[0] += len(chunk)
            if progress is not None:
                progress(done[0])

    def chunks() -> Iterable[List[Tuple[Any, Any]]]:
        chunk: List[Tuple[Any, Any]] = []
        for kv in items:
            chunk.append(kv)
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    if threads <= 1:
        for c in chunks():
            put_batch(c)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as ex:
            for f in [ex.submit(put_batch, c) for c in chunks()]:
                f.result()
    return done[0]
