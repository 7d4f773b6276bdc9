"""asyncio for readers: await a revision, iterate over changes, without a thread per waiter.

Owns one background thread per snapshot name per process (a :class:`_Notifier`,
created on first use, a daemon) that sleeps in the kernel on the seq word of its
own read-only mapping of the control segment (futex.py) and, when the word
changes, resolves the futures coroutines are awaiting through
``loop.call_soon_threadsafe``. Any number of coroutines on any number of event
loops share that one thread; with nobody waiting it sleeps on a condition
variable (no CPU). Where futexes are unavailable it polls the word every 1-4 ms
instead, still one thread.

The coroutines read the snapshot through the caller's :class:`Reader`, in the
event loop's thread (the Reader may be shared with other threads too):
``reader.revision`` and ``reader.changes`` are the only Reader calls made, each
cheap (no I/O, no blocking). Usable from uvicorn/aiohttp workers::

    from shmkeyspace import Reader, aio
    reader = Reader("services")
    async def handler():
        ok = await aio.wait_for_revision(reader, rev, timeout=2.0)
        async for revision, keys in aio.watch(reader, prefix="/services/"):
            ...
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Protocol, Tuple

from . import feed, futex, segment


class AsyncSource(Protocol):
    """What the coroutines need of a Reader (this module imports no reader code)."""

    name: str

    @property
    def owner_uid(self) -> int: ...

    @property
    def revision(self) -> int: ...

    def changes(self, since_revision: int) -> feed.Changes: ...


log = logging.getLogger(__name__)

__all__ = ["wait_for_revision", "watch"]

_SLICE = 0.5  # longest kernel sleep while futures wait: cancelled ones are dropped this often


class _Notifier:
    """Resolves futures when the seq word of snapshot ``name`` changes. Thread-safe."""

    def __init__(self, name: str, owner_uid: int) -> None:
        self.name = name
        # Our own mapping (the Reader may close its own), trusting the owner the
        # Reader already checked.
        self._owner_uid = owner_uid
        self._ctrl = segment.ControlView(name, owner_uid)
        self._words = self._ctrl.words
        self._addr = self._ctrl.seq_address()
        self._left: List[segment.ControlView] = []  # blocks followed away from (kept mapped)
        self._cond = threading.Condition()
        self._subs: List[Tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"shmkeyspace-aio-{name}")
        self._thread.start()

    def seq(self) -> int:
        return self._words[segment.OFF_SEQ // 8]

    def changed_since(self, seen: int, loop: asyncio.AbstractEventLoop) -> "asyncio.Future[None]":
        """A future (of ``loop``) resolved once the seq word is no longer ``seen``."""
        fut: "asyncio.Future[None]" = loop.create_future()
        with self._cond:
            if self.seq() != seen:
                fut.set_result(None)
                return fut
            self._subs.append((seen, loop, fut))
            self._cond.notify()
        return fut

    def _follow(self) -> bool:
        """True if this block is retired (then every waiter re-checks, each slice: its Reader
        follows the name); opens the name's new block when there is one."""
        if not self._ctrl.retired:
            return False
        if self._ctrl.moved():
            try:
                new = segment.ControlView(self.name, self._owner_uid)
            except Exception:  # not there yet, or not a writer's: keep polling
                return True
            self._left.append(self._ctrl)
            self._ctrl, self._words, self._addr = new, new.words, new.seq_address()
        return True

    def _run(self) -> None:
        delay = 0.001
        while True:
            with self._cond:
                while not self._subs:
                    self._cond.wait()
                cur = self.seq()
                retired = self._follow()
                ready = [s for s in self._subs if s[0] != cur or retired]
                self._subs = [s for s in self._subs if s[0] == cur and not retired and not s[2].done()]
            for _, loop, fut in ready:
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    pass
            if ready:
                delay = 0.001
            # The kernel compares the word with ``cur`` first: a publication between
            # the load above and this call returns at once.
            if not futex.wait(self._addr, cur, _SLICE):
                time.sleep(delay)
                delay = min(0.004, delay * 2)


def _resolve(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


_notifiers: Dict[Tuple[str, int], _Notifier] = {}
_notifiers_lock = threading.Lock()
_notifiers_pid = os.getpid()


def _notifier(name: str, owner_uid: int) -> _Notifier:
    global _notifiers, _notifiers_pid
    with _notifiers_lock:
        if _notifiers_pid != os.getpid():  # forked: the threads did not come along
            _notifiers, _notifiers_pid = {}, os.getpid()
        n = _notifiers.get((name, owner_uid))
        if n is None:
            n = _notifiers[name, owner_uid] = _Notifier(name, owner_uid)
        return n


async def wait_for_revision(reader: AsyncSource, revision: int, timeout: Optional[float] = None) -> bool:
    """Await until ``reader``'s published revision is >= ``revision``; False on timeout.

    The asyncio twin of :meth:`Reader.wait_for_revision`: no thread of its own,
    resumed ~0.1-0.3 ms after the publication (bench/scenarios/feed.py).
    """
    loop = asyncio.get_running_loop()
    n = _notifier(reader.name, reader.owner_uid)
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        seen = n.seq()  # before the check: a publication after it resolves the future
        if reader.revision >= revision:
            return True
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return False
        fut = n.changed_since(seen, loop)
        try:
            await asyncio.wait_for(fut, left)
        except asyncio.TimeoutError:
            return reader.revision >= revision


async def watch(
    reader: AsyncSource, prefix: Any = None, since: Optional[int] = None, timeout: Optional[float] = None
) -> AsyncIterator[Tuple[int, feed.Changes]]:
    """Async iterator of ``(revision, keys)``: the asyncio twin of :meth:`Reader.watch`.

    Same items, same ChangesTooOldError when it falls behind the writer's feed,
    same ``timeout`` (end after that many seconds without an item).
    """
    pb = feed.prefix_bytes(prefix)
    loop = asyncio.get_running_loop()
    if since is None:
        since = reader.revision
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return
        wait = feed.WATCH_SLICE if left is None else min(left, feed.WATCH_SLICE)
        if not await wait_for_revision(reader, since + 1, wait):
            if reader.revision < since:
                raise feed.backwards_error(since, reader.revision)
            continue
        since, keys = feed.advance(reader, since, pb)
        if keys is not None:
            yield since, keys
            if timeout is not None:
                deadline = loop.time() + timeout
