"""POSIX shared-memory segments and the publication seqlock: the layout and both halves.

Owns the on-host layout of one snapshot name ``NAME`` and the seqlock over it (the
readers' :class:`ControlView`/:class:`DataView`, the writer's :func:`store_seq` and
:func:`retire_block`); the writer that fills the segments is ``publisher.Publisher``,
the lock that makes it the only one is ``writerlock.py``. Promises: readers never
see a torn publication; a retired block tells readers to re-open the name.

The segments:

* a control segment ``/shmks.NAME`` (one page, never resized, never unlinked by a
  writer) holding the seqlock word, two publication records, the writer's pid and
  heartbeat;
* data segments ``/shmks.NAME.GEN``, one per generation, each holding two buffers
  (three with a view grace: :attr:`publisher.Publisher.buffers`).

Seqlock protocol (``seq`` counts half-publications):
    writer:  seq is even and names the active record ``(seq >> 1) & 1``. To publish,
             set seq odd, fill the *other* record's buffer and the record, then set
             seq to the next even value. The buffer of the active record is not
             touched until the publication after next.
    reader:  s1 = seq; read record ``(s1 >> 1) & 1`` and its buffer; s2 = seq.
             The read is consistent iff ``s2 <= (s1 & ~1) + 2``: that buffer is only
             rewritten once seq reaches ``(s1 & ~1) + 3``.
A reader never writes and never waits for the writer; a killed writer leaves seq
odd at worst, and readers keep answering from the last complete publication.

Memory ordering. x86-64 is TSO: stores become visible in program order and loads
are not reordered with older loads, so the writer's data stores are visible before
its seq store, and a reader's loads of seq / data / seq happen in order. Every
access here is a C-level memcpy or aligned 8-byte load/store inside one CPython
call, which the compiler cannot move across the opaque calls between bytecodes.
aarch64 and other weakly ordered CPUs need barriers: :func:`fence` (an uncontended
``threading.Lock`` acquire+release, which is a full barrier, measured at 0.16 us)
is issued by the writer before and after each seq store, and by readers after
loading s1 and before loading s2 whenever :data:`NEEDS_FENCE` is true. The torture test in
``tests/test_torture.py`` checks every answer against its revision.

Trust (rules in ``trust.py``): /dev/shm is world-writable, so any local user can
create a segment under a name first. The writer creates segments exclusively and
reuses a pre-existing control segment only if it owns it and nobody else may write
it; readers map a control segment only if its owner is root, themselves or the
writer uid they were told to trust, and nobody else may write it, and a data
segment only if it has the control segment's owner. Each check is an fstat of the
fd that is then mapped.

Wake-ups: after each even seq store the writer issues FUTEX_WAKE on the low 32
bits of the seq word (futex.py, shared futexes keyed by the shm page, so readers'
read-only mappings at other addresses share them); readers sleep with FUTEX_WAIT
on the value they last loaded, so a publication between their load and their
sleep returns at once. The wake is unconditional (readers cannot count themselves
in a read-only mapping; it costs one syscall, ~1-4 us, with nobody waiting).

Change feed: each publication may write a feed region (feed.py) after its image
in the same buffer, at ``offset + feed_offset(length)``; the record's last word is
its length. It is covered by the same seqlock as the image.

Writer exclusivity (writerlock.py): the writer holds ``flock(LOCK_EX)`` on its lock file
(:func:`writerlock.lock_path`, mode 0600: readers of another uid cannot even open it, so no
reader can hold the lock that decides who writes) for its whole life; the kernel
drops it when the process dies, even on SIGKILL, so a restarted writer takes over
and a second live one is refused. A running writer checks before each publication
and each heartbeat that its control segment and lock file are still the files it
opened (:meth:`publisher.Publisher.lost`): after an ``rm`` of either it retires its block and
stops (WriterLostError), so two writers never serve one name.

Retirement: a control block whose writer gave the name up (stopped with unlink,
lost it, or ``unlink`` removed it) carries FLAG_RETIRED and one last republication
of its active record (seq moves, the image stays): readers notice at their next
query and re-open the name, following a writer that re-created the segments.

Restarts: :attr:`publisher.Publisher.previous` is the predecessor's last complete
publication with its record extension (cluster id, identity, epoch), so a
restarted writer can take that image over instead of publishing an older one.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import re
import struct
import threading
from typing import AbstractSet, Any, List, NamedTuple, Tuple, Union

import posix_ipc
from xxhash import xxh3_64_intdigest

from . import futex, trust
from .errors import (
    CorruptSegmentError,
    InvalidNameError,
    SegmentNotFoundError,
    SegmentPermissionError,
    UntrustedSegmentError,
)

PAGE = mmap.PAGESIZE
CTRL_MAGIC = b"SHMKSCTL"
DATA_MAGIC = b"SHMKSDAT"
LAYOUT_VERSION = 1
CTRL_SIZE = 4096

# Control block: magic, version, then u64 words.
CTRL_HEAD = struct.Struct("<8sII")  # magic, layout version, reserved
OFF_SEQ = 16
OFF_PID = 24
OFF_HEARTBEAT = 32  # CLOCK_MONOTONIC ns (system-wide on Linux)
OFF_STARTED = 40  # wall-clock ns when the writer started
OFF_HB_INTERVAL = 48  # heartbeat interval, ns
OFF_ETCD_REV = 56  # newest etcd revision the writer has heard of
OFF_RECORDS = 64
OFF_CONTACT = 192  # CLOCK_MONOTONIC ns of the writer's last contact with etcd (0: none yet)
OFF_STALE_AFTER = 200  # the writer's stale_after, ns (0: a writer that does not track contact)
OFF_SOURCE = 208  # where the published data came from: SOURCE_* below
#: Values of the OFF_SOURCE word: a writer that never says (or an old one),
#: a snapshot restored from the state file and not yet caught up with etcd,
#: a snapshot current with etcd.
SOURCE_UNKNOWN, SOURCE_DISK, SOURCE_ETCD = 0, 1, 2
SOURCE_NAMES = {SOURCE_UNKNOWN: "unknown", SOURCE_DISK: "disk", SOURCE_ETCD: "etcd"}
OFF_WAKE = 216  # 216..231: reserved for wake-up words (unused: the seq word is the futex)
#: The writer's PID namespace (st_ino of /proc/self/ns/pid; 0: unknown). A reader in
#: another namespace (a container) cannot use the PID word as a pid of its own.
OFF_PIDNS = 232
#: FLAG_* bits below. Written by whoever retires the segment, before it is unlinked.
OFF_FLAGS = 240
#: This control segment no longer belongs to the name: its writer stopped after it was
#: removed or replaced, or ``unlink`` removed it. Readers re-open the name.
FLAG_RETIRED = 1
#: The writer's view grace, ns (0: none, or an older writer): a buffer is not
#: rewritten until this long after it stopped being the published one, so a
#: snapshot view stays valid at least this long after it was opened.
OFF_VIEW_GRACE = 248
#: Per publication record slot, 32 B: the etcd cluster id, the identity (an xxh3 of
#: prefix and decoder name: see :func:`identity`), the history epoch and the number of
#: keys left out (decode failures) of the image that slot names. Written with the record, under the same
#: seqlock. The epoch is raised when a writer publishes a snapshot that does not
#: continue the previous one's history (etcd recreated or restored from a backup):
#: revisions compare only within one epoch, and within one they never decrease.
OFF_RECORD_EXT = 256
RECORD_EXT = struct.Struct("<QQQQ")
#: State files written, failures to write one, wall-clock ns of the last success
#: and of the last failure (fail static; 0: none).
OFF_PERSISTS = 320
OFF_PERSIST_FAILURES = 328
OFF_PERSIST_NS = 336
OFF_PERSIST_FAIL_NS = 344
#: The writer's full load: LOAD_* state below, keys read so far, pages asked again
#: (timeouts), loads started again from the first key (load.py, Writer.load).
OFF_LOAD_STATE = 352
OFF_LOAD_KEYS = 360
OFF_LOAD_RETRIES = 368
OFF_LOAD_RESTARTS = 376
LOAD_IDLE, LOAD_LOADING, LOAD_WAITING = 0, 1, 2
LOAD_STATE_NAMES = {LOAD_IDLE: "idle", LOAD_LOADING: "loading", LOAD_WAITING: "waiting"}
# Publication record: gen, seg_size, offset, length, revision, count, publish_ns, feed_len.
# feed_len: bytes of the change feed region (feed.py) written right after the image,
# at offset + feed_offset(length); 0 = no feed (writers before the feed wrote 0 here).
#: Index of the seq word in :attr:`ControlView.words` (the readers' hot path).
SEQ_WORD = OFF_SEQ // 8
RECORD = struct.Struct("<QQQQqQQQ")
U64 = struct.Struct("<Q")

# magic, version, buffers (0: 2, from writers before it was recorded), gen, seg_size,
# buf_size, buf0_off.
DATA_HEAD = struct.Struct("<8sIIQQQQ")
#: Buffers per data segment: 2, or 3 with a view grace (see Publisher._rest). The
#: writer fills them in strict rotation, so the buffer of one publication is next
#: written by the publication ``buffers`` later; a snapshot view relies on that.
MAX_BUFFERS = 8

#: True where plain loads and stores may be reordered (anything but x86).
NEEDS_FENCE = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86")
_fence_lock = threading.Lock()

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


class Published(NamedTuple):
    """One complete publication as its record (and record extension) describes it."""

    gen: int
    seg_size: int
    offset: int
    length: int
    revision: int
    key_count: int
    publish_ns: int
    feed_len: int
    cluster_id: int
    identity: int
    epoch: int
    #: Keys under the prefix the image leaves out (decode failures), as its writer counted.
    excluded: int


def identity(prefix: bytes, decoder_name: str) -> int:
    """What a snapshot is a mirror of, as one word: xxh3_64 of the prefix and the decoder's name.

    Two writers of one name with equal identities publish interchangeable images
    (same keys, same decoding); a writer takes over a predecessor's image only then.
    Never 0 (0 means "not recorded": an older writer).
    """
    return xxh3_64_intdigest(bytes(prefix) + b"\0" + decoder_name.encode()) or 1


def feed_offset(image_length: int) -> int:
    """Where a publication's change feed starts, relative to its image (8-aligned)."""
    return (image_length + 7) & ~7


def pid_namespace(pid: Union[int, str] = "self") -> int:
    """The inode of ``pid``'s PID namespace (/proc/PID/ns/pid), 0 if it cannot be read."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def fence() -> None:
    """A full memory barrier (see module doc)."""
    _fence_lock.acquire()
    _fence_lock.release()


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid snapshot name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"snapshot name must be str, not {type(name).__name__}")
    if not _NAME_RE.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid snapshot name {name!r}: use 1-200 characters from [A-Za-z0-9_.-], "
            "not starting with '.' or '-' and without '..'"
        )
    return name


def ctrl_name(name: str) -> str:
    return f"/shmks.{validate_name(name)}"


def data_name(name: str, gen: int) -> str:
    return f"/shmks.{validate_name(name)}.{gen}"


def shm_path(shm_name: str) -> str:
    """Where Linux shows a POSIX shm object (for docs and cleanup)."""
    return "/dev/shm" + shm_name


def unlink_hint(name: str, shm_name: str) -> str:
    return f"remove it (as root or its owner: shmkeyspace unlink {name}, or rm {shm_path(shm_name)})"


def _open_ro(
    shm_name: str, what: str, label: str, uids: AbstractSet[int], remedy: str, owner_hint: str
) -> Tuple[mmap.mmap, os.stat_result]:
    """Map ``shm_name`` read-only after checking, on the fd's fstat, who owns it (trust.py).

    Returns (mapping, the fd's fstat). ``label`` and ``remedy`` word an
    UntrustedSegmentError; ``what`` the not-found and permission errors.
    """
    path = shm_path(shm_name)
    try:
        fd = trust.open_nofollow(path, os.O_RDONLY, what=label, remedy=remedy)
    except UntrustedSegmentError:
        raise
    except FileNotFoundError:
        raise SegmentNotFoundError(f"no shared memory segment {shm_name} ({what})") from None
    except PermissionError as exc:
        raise SegmentPermissionError(
            errno.EACCES,
            f"no permission to read {shm_name} ({what}): {os.strerror(exc.errno or errno.EACCES)}",
        ) from None
    try:
        st = os.fstat(fd)
        trust.check_owned(st, path, uids, what=label, remedy=remedy, owner_hint=owner_hint)
        size = st.st_size
        if size == 0:
            raise CorruptSegmentError(f"{shm_name} is empty ({what})")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return mm, st
    finally:
        os.close(fd)


class ControlView:
    """Read-only mapping of a control segment. Owned by one Reader; ``close()`` unmaps.

    Refuses (UntrustedSegmentError) a control segment that is not a regular file,
    is writable by group or others, or is owned by anyone but root, this process's
    euid and ``writer_uid`` (None: ``$SHMKEYSPACE_WRITER_UID``); see trust.py.
    ``owner_uid`` is its owner, which every data segment must share.
    """

    def __init__(self, name: str, writer_uid: Union[int, str, None] = None) -> None:
        self.name = validate_name(name)
        self.shm_name = ctrl_name(name)
        self.mm, st = _open_ro(
            self.shm_name,
            f"snapshot {name!r}: is its writer running?",
            f"snapshot {name!r}: control segment",
            trust.trusted_writer_uids(writer_uid),
            unlink_hint(name, self.shm_name) + " and restart its writer",
            "if uid {uid} runs the writer you mean to read, trust it with Reader(..., writer_uid={uid}) "
            f"or {trust.WRITER_UID_ENV}={{uid}}; otherwise",
        )
        size, self.owner_uid = st.st_size, st.st_uid
        #: (st_dev, st_ino) of the file mapped: another one under the name is another writer's.
        self.file_id = file_id(st)
        if size < CTRL_SIZE:
            self.mm.close()
            raise CorruptSegmentError(f"{self.shm_name} is {size} bytes, expected {CTRL_SIZE}")
        magic, version, _ = CTRL_HEAD.unpack_from(self.mm, 0)
        if magic == b"\0" * 8:
            self.mm.close()
            raise SegmentNotFoundError(f"snapshot {name!r} has no publication yet (writer starting?)")
        if magic != CTRL_MAGIC:
            self.mm.close()
            raise CorruptSegmentError(
                f"{self.shm_name} is not a shmkeyspace control segment (magic {magic!r})"
            )
        if version != LAYOUT_VERSION:
            self.mm.close()
            raise CorruptSegmentError(
                f"{self.shm_name} has layout version {version}; this shmkeyspace reads {LAYOUT_VERSION}"
            )
        #: The seqlock word and the other u64 fields, as an indexable view. Only
        #: the first CTRL_SIZE bytes: a segment grown to an odd size by someone
        #: else must not make cast() raise TypeError.
        self.words: Any = memoryview(self.mm)[:CTRL_SIZE].cast("Q")

    def record(self, slot: int) -> Tuple[int, ...]:
        """Publication record ``slot`` (0 or 1): gen, seg_size, offset, length, revision,
        count, publish_ns, feed_len."""
        return RECORD.unpack_from(self.mm, OFF_RECORDS + slot * RECORD.size)

    def record_ext(self, slot: int) -> Tuple[int, int, int]:
        """(cluster id, identity, epoch) of record ``slot`` (zeros from older writers)."""
        return RECORD_EXT.unpack_from(self.mm, OFF_RECORD_EXT + slot * RECORD_EXT.size)[:3]

    @property
    def retired(self) -> bool:
        """True once this block's writer (or ``unlink``) gave the name up: re-open it. One load."""
        words = self.words
        return words is not None and bool(words[OFF_FLAGS // 8] & FLAG_RETIRED)

    def moved(self) -> bool:
        """True if the name now opens another file than this one (or none). One stat."""
        try:
            return file_id(os.stat(shm_path(self.shm_name), follow_symlinks=False)) != self.file_id
        except OSError:
            return True

    def seq_address(self) -> int:
        """Address of the seq word in this mapping, for :func:`futex.wait` (valid until close)."""
        return futex.address(self.mm, OFF_SEQ)

    def active_record(self, seq: int) -> Tuple[int, ...]:
        """The record a reader that loaded ``seq`` reads (see the seqlock protocol)."""
        return self.record((seq >> 1) & 1)

    def close(self) -> None:
        if self.words is not None:
            self.words.release()
            self.words = None
            self.mm.close()

    def __enter__(self) -> "ControlView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DataView:
    """Read-only mapping of one data-segment generation.

    Refuses (UntrustedSegmentError) a segment not owned by ``owner_uid`` (the
    control segment's owner: one writer creates both) or writable by others.
    """

    def __init__(self, name: str, gen: int, expect_size: int, *, owner_uid: int) -> None:
        self.gen = gen
        self.shm_name = data_name(name, gen)
        self.mm, st = _open_ro(
            self.shm_name,
            f"generation {gen} of {name!r}",
            f"snapshot {name!r}: data segment",
            {owner_uid},
            unlink_hint(name, self.shm_name),
            "its control segment's owner (who creates every data segment) did not create it; "
            "someone else did, so",
        )
        self.size = st.st_size
        #: The file id of the control block whose record named this generation.
        self.ctrl_id: Tuple[int, int] = (0, 0)
        if self.size < expect_size or self.size < DATA_HEAD.size:
            self.mm.close()
            raise CorruptSegmentError(f"{self.shm_name} is {self.size} bytes, record says {expect_size}")
        magic, version, nbuf, g, _, buf_size, buf0 = DATA_HEAD.unpack_from(self.mm, 0)
        if magic != DATA_MAGIC or version != LAYOUT_VERSION or g != gen:
            self.mm.close()
            raise CorruptSegmentError(f"{self.shm_name} is not generation {gen} of a shmkeyspace snapshot")
        #: Buffers the writer rotates through (see MAX_BUFFERS): a view's buffer is
        #: rewritten ``buffers`` publications after the one it reads.
        self.buffers = nbuf or 2
        if not 2 <= self.buffers <= MAX_BUFFERS or buf0 + self.buffers * buf_size > self.size:
            self.mm.close()
            raise CorruptSegmentError(f"{self.shm_name}: {nbuf} buffers of {buf_size} bytes do not fit it")
        self.buf: Any = memoryview(self.mm)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
            try:
                self.mm.close()
            except BufferError:  # a SnapshotView still holds a slice; GC closes it later
                pass


def snapshot_names() -> List[str]:
    """Names of the snapshots with a control segment on this host, sorted (lists /dev/shm)."""
    if not os.path.isdir("/dev/shm"):
        return []
    out = []
    for fn in os.listdir("/dev/shm"):
        name = fn[len("shmks.") :] if fn.startswith("shmks.") else ""
        if name and not name.rsplit(".", 1)[-1].isdigit() and _NAME_RE.match(name) and ".." not in name:
            out.append(name)
    return sorted(out)


def segment_files(name: str) -> List[Tuple[str, int]]:
    """``(shm name, generation)`` of every segment of snapshot ``name`` on this host,
    the control segment (generation 0) first, then the data generations in order."""
    prefix = f"shmks.{validate_name(name)}"
    out = []
    if os.path.isdir("/dev/shm"):
        for fn in os.listdir("/dev/shm"):
            if fn == prefix:
                out.append(("/" + fn, 0))
            elif fn.startswith(prefix + ".") and fn[len(prefix) + 1 :].isdigit():
                out.append(("/" + fn, int(fn[len(prefix) + 1 :])))
    return sorted(out, key=lambda t: t[1])


def retire_block(ctrl: Any, words: Any, seq_addr: int) -> None:
    """Set FLAG_RETIRED and republish the active record (its copy in the other slot).

    seq: S (even) -> S+1 -> S+2. At S+2 the active slot is the other one, which now
    holds the same record and extension, so readers see the same image (a reader
    that loaded S reads a buffer rewritten only at S+3: none follows). Caller: the
    lock holder (a writer, or ``unlink`` holding the lock).
    """
    seq = words[OFF_SEQ // 8]
    words[OFF_FLAGS // 8] |= FLAG_RETIRED
    if seq < 2:
        futex.wake(seq_addr)
        return
    if seq % 2:  # a writer died mid-publication: the other slot is the incomplete one
        seq -= 1
    else:
        fence()
        words[OFF_SEQ // 8] = seq + 1
        fence()
    cur = (seq >> 1) & 1
    nxt = 1 - cur
    ctrl[OFF_RECORDS + nxt * RECORD.size : OFF_RECORDS + (nxt + 1) * RECORD.size] = ctrl[
        OFF_RECORDS + cur * RECORD.size : OFF_RECORDS + (cur + 1) * RECORD.size
    ]
    ext = OFF_RECORD_EXT
    ctrl[ext + nxt * RECORD_EXT.size : ext + (nxt + 1) * RECORD_EXT.size] = ctrl[
        ext + cur * RECORD_EXT.size : ext + (cur + 1) * RECORD_EXT.size
    ]
    fence()
    words[OFF_SEQ // 8] = seq + 2
    fence()
    futex.wake(seq_addr)


def file_id(st: os.stat_result) -> Tuple[int, int]:
    return (st.st_dev, st.st_ino)


def unlink_quiet(shm_name: str) -> int:
    try:
        posix_ipc.unlink_shared_memory(shm_name)
        return 1
    except posix_ipc.ExistentialError:
        return 0


def store_seq(words: Any, seq: int) -> None:
    """The writer's seq store, with a full barrier on both sides (~0.2 us).

    The barriers matter on aarch64: the buffer and record stores before an even
    seq must be visible first, and an odd seq must be visible before the buffer is
    touched, or a reader could see new bytes under an old seq. Caller: the lock holder.
    """
    fence()
    words[OFF_SEQ // 8] = seq
    fence()
