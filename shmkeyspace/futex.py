"""Kernel wake-ups on a word of shared memory (Linux futex), with a polling fallback.

Owns the two halves of the publication wake-up: the writer calls :func:`wake` on
the seq word after each publication, readers call :func:`wait` with the value they
last saw. Both use *shared* futexes (no ``FUTEX_PRIVATE_FLAG``): the kernel keys
them by the shared-memory page (inode, offset), so a reader's read-only mapping at
one address and the writer's mapping at another name the same futex. FUTEX_WAIT only
reads the word, which a ``PROT_READ`` mapping allows (tests/test_feed.py checks it
across processes).

The futex word is the low 32 bits of the little-endian u64 seq word: every
publication changes it (seq grows by 2), so a waiter that passes the value it read
can never miss one — the kernel compares that value with the word under its own lock
and returns at once if they differ.

Costs (measured on the 2-core dev VM, Python 3.11, ``bench/scenarios/feed.py``): a
``wake`` with nobody waiting is one syscall through ctypes, ~1 us, so the writer
issues it unconditionally (readers map the control block read-only and cannot keep
a waiter count for it to test); a ``wait`` that returns at once costs about the same.

Where futexes are unavailable (not Linux, an unknown architecture, or the syscall
fails with ENOSYS) :data:`AVAILABLE` is False and callers poll instead.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import platform
import sys
from typing import Any, Optional

log = logging.getLogger(__name__)

# SYS_futex per architecture (asm/unistd.h).
_SYS_FUTEX = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
    "riscv64": 98,
    "ppc64le": 221,
    "s390x": 238,
}
FUTEX_WAIT = 0
FUTEX_WAKE = 1
_INT_MAX = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer (stable since 3.3): only ``buf`` is read here.
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_syscall: Any = None
_nr = _SYS_FUTEX.get(platform.machine().lower())
if sys.platform.startswith("linux") and _nr is not None:
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _syscall = _libc.syscall
        _syscall.restype = ctypes.c_long
        _syscall.argtypes = [
            ctypes.c_long,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _syscall = None

#: True where :func:`wait`/:func:`wake` use the kernel; False means "poll".
AVAILABLE = _syscall is not None


def address(buf: Any, offset: int) -> int:
    """The address of byte ``offset`` of a buffer-protocol object (an mmap).

    Works on read-only buffers (``ctypes.c_char.from_buffer`` does not). The
    buffer export is released at once: the address stays valid only while the
    mapping does, so callers must stop using it before they close the mmap.
    Returns 0 (callers then poll) where futexes or the CPython buffer API are
    unavailable.
    """
    if not AVAILABLE:
        return 0
    view = _PyBuffer()
    try:
        api = ctypes.pythonapi
    except AttributeError:  # pragma: no cover - not CPython: no buffer address, so poll
        return 0
    api.PyObject_GetBuffer(ctypes.py_object(buf), ctypes.byref(view), 0)
    try:
        if offset < 0 or offset + 4 > view.len:
            raise ValueError(f"offset {offset} outside a {view.len}-byte buffer")
        return int(view.buf) + offset
    finally:
        api.PyBuffer_Release(ctypes.byref(view))


def _disable(err: int) -> None:
    global AVAILABLE
    if AVAILABLE:
        AVAILABLE = False
        log.warning("futex unavailable (%s): waiters fall back to polling", errno.errorcode.get(err, err))


def wait(addr: int, expected: int, timeout: Optional[float]) -> bool:
    """Sleep while the u32 at ``addr`` equals ``expected & 0xFFFFFFFF``.

    Returns after a wake-up, a timeout, a signal, or at once if the word already
    differs; callers re-check their condition in every case (spurious returns are
    allowed). ``timeout`` None sleeps until woken. Returns False if futexes are
    unavailable (the caller must poll).
    """
    if not AVAILABLE or not addr:
        return False
    if timeout is None:
        ts = None
    else:
        t = max(0.0, timeout)
        sec = int(t)
        ts = ctypes.byref(_Timespec(sec, int((t - sec) * 1e9)))
    r = _syscall(_nr, addr, FUTEX_WAIT, expected & 0xFFFFFFFF, ts, None, 0)
    if r < 0:
        err = ctypes.get_errno()
        if err == errno.EFAULT:  # not mapped (any more): this caller polls, others keep futexes
            return False
        if err in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            _disable(err)
            return False
        # EAGAIN (word differs), ETIMEDOUT, EINTR: the caller re-checks.
    return True


def wake(addr: int) -> int:
    """Wake every waiter on the u32 at ``addr``; returns how many were woken (-1: no futex).

    One syscall, ~1 us when nobody waits.
    """
    if not AVAILABLE or not addr:
        return -1
    r = _syscall(_nr, addr, FUTEX_WAKE, _INT_MAX, None, None, 0)
    if r < 0:
        _disable(ctypes.get_errno())
        return -1
    return int(r)
