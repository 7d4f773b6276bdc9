"""The writer process's C heap: keeping a full load's garbage out of its RSS.

Owns the two glibc calls the writer makes (:func:`tune_heap`, :func:`trim_heap`)
and promises: each is a no-op returning False where libc is not glibc, and
neither changes what any allocation returns, only when freed pages go back to
the kernel. Why they exist, with the measurements, in their docstrings
(issue 22 item 4; ``./run bench --only writer_memory``).
"""

from __future__ import annotations

#: glibc's M_MMAP_THRESHOLD (mallopt parameter -3) and its initial value, 128 KiB.
_M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 << 10


def tune_heap() -> bool:
    """Pin glibc's mmap threshold at 128 KiB for this process (the writer daemon's); False if unavailable.

    glibc raises the threshold each time a large block served by mmap is freed
    (up to 32 MiB), after which blocks of that size come from the heap instead,
    where they fragment it: a full load frees many (gRPC page buffers, the
    growing arena's old copies), so its garbage then stays in RSS. Pinned, large
    blocks are mmap'd and go back to the kernel when freed. Measured at 100k
    keys of ~110 B JSON (bench/scenarios/writer_memory.py, same run as the env variable
    MALLOC_MMAP_THRESHOLD_=131072): RssAnon after the load 55 -> 38 MiB, load
    time unchanged. Process-wide, so the CLI's writer calls it, not Writer
    (a library user's process keeps its own malloc settings).
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``); False if unavailable.

    Why after a full load: its pages (gRPC buffers, parsed protobuf, the decoded
    values) are freed, but glibc keeps them in the heap and in the arenas of the
    threads that fetched them, so they stay in the writer's RSS for its whole
    life. Measured at 100k keys of ~110 B JSON (bench/scenarios/writer_memory.py): RssAnon
    67 -> 46 MiB, in a few milliseconds. A no-op where libc is not glibc.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
