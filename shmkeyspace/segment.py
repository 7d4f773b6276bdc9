"""POSIX shared-memory segments and the publication seqlock.

Owns the on-host layout of one snapshot name ``NAME``:

* a control segment ``/shmks.NAME`` (one page, never resized, never unlinked by a
  writer) holding the seqlock word, two publication records, the writer's pid and
  heartbeat;
* data segments ``/shmks.NAME.GEN``, one per generation, each holding two buffers
  (three with a view grace: :attr:`Publisher.buffers`).

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

Writer exclusivity: the writer holds ``flock(LOCK_EX)`` on its lock file
(:func:`lock_path`, mode 0600: readers of another uid cannot even open it, so no
reader can hold the lock that decides who writes) for its whole life; the kernel
drops it when the process dies, even on SIGKILL, so a restarted writer takes over
and a second live one is refused. A running writer checks before each publication
and each heartbeat that its control segment and lock file are still the files it
opened (:meth:`Publisher.lost`): after an ``rm`` of either it retires its block and
stops (WriterLostError), so two writers never serve one name.

Retirement: a control block whose writer gave the name up (stopped with unlink,
lost it, or ``unlink`` removed it) carries FLAG_RETIRED and one last republication
of its active record (seq moves, the image stays): readers notice at their next
query and re-open the name, following a writer that re-created the segments.

Restarts: :attr:`Publisher.previous` is the predecessor's last complete
publication with its record extension (cluster id, identity, epoch), so a
restarted writer can take that image over instead of publishing an older one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import re
import stat
import struct
import threading
import time
from typing import AbstractSet, Any, Callable, List, NamedTuple, Optional, Tuple, Union

import posix_ipc
from xxhash import xxh3_64_intdigest

from . import futex, trust
from .errors import (
    CorruptSegmentError,
    InvalidNameError,
    InvalidSettingError,
    SegmentFullError,
    SegmentNotFoundError,
    SegmentPermissionError,
    UntrustedSegmentError,
    WriterExistsError,
    WriterLostError,
)

PAGE = mmap.PAGESIZE
CTRL_MAGIC = b"SHMKSCTL"
DATA_MAGIC = b"SHMKSDAT"
LAYOUT_VERSION = 1
CTRL_SIZE = 4096

# Control block: magic, version, then u64 words.
_CTRL_HEAD = struct.Struct("<8sII")  # magic, layout version, reserved
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
_DATA_HEAD = struct.Struct("<8sIIQQQQ")
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


def lock_path(name: str) -> str:
    """The writer lock file of ``name``: ``/dev/shm/.shmks.NAME.lock``, mode 0600.

    Beside the segments (so containers sharing one directory at /dev/shm share the
    lock too), but not a segment: only the writer's uid (and root) can open it, so
    no reader can take or hold the lock that decides who writes.
    """
    return f"/dev/shm/.shmks.{validate_name(name)}.lock"


def _unlink_hint(name: str, shm_name: str) -> str:
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
            _unlink_hint(name, self.shm_name) + " and restart its writer",
            "if uid {uid} runs the writer you mean to read, trust it with Reader(..., writer_uid={uid}) "
            f"or {trust.WRITER_UID_ENV}={{uid}}; otherwise",
        )
        size, self.owner_uid = st.st_size, st.st_uid
        #: (st_dev, st_ino) of the file mapped: another one under the name is another writer's.
        self.file_id = _file_id(st)
        if size < CTRL_SIZE:
            self.mm.close()
            raise CorruptSegmentError(f"{self.shm_name} is {size} bytes, expected {CTRL_SIZE}")
        magic, version, _ = _CTRL_HEAD.unpack_from(self.mm, 0)
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
            return _file_id(os.stat(shm_path(self.shm_name), follow_symlinks=False)) != self.file_id
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
            _unlink_hint(name, self.shm_name),
            "its control segment's owner (who creates every data segment) did not create it; "
            "someone else did, so",
        )
        self.size = st.st_size
        #: The file id of the control block whose record named this generation.
        self.ctrl_id: Tuple[int, int] = (0, 0)
        if self.size < expect_size or self.size < _DATA_HEAD.size:
            self.mm.close()
            raise CorruptSegmentError(f"{self.shm_name} is {self.size} bytes, record says {expect_size}")
        magic, version, nbuf, g, _, buf_size, buf0 = _DATA_HEAD.unpack_from(self.mm, 0)
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


class Publisher:
    """The writer's side of one snapshot name: owns the control and data segments.

    Holds the writer lock from construction to :meth:`close`; a context manager
    (leaving the block closes it, unlinking iff ``unlink_on_close``). Not thread-safe:
    one thread publishes (the heartbeat uses its own aligned 8-byte stores).

    ``mode`` must not let group or others write (readers would refuse the
    segments). ``uid``: the owner segments are published as (default: this
    process's euid; another uid needs root): a pre-existing control segment is
    reused only if that uid owns it and nobody else may write it, otherwise
    UntrustedSegmentError says whose it is and what to do. Data segments are
    always created exclusively (trust.py).
    """

    def __init__(
        self,
        name: str,
        mode: int = 0o600,
        gid: Optional[int] = None,
        unlink_on_close: bool = False,
        uid: Union[int, str, None] = None,
        view_grace: float = 0.0,
    ) -> None:
        self.name = validate_name(name)
        if not view_grace >= 0:
            raise InvalidSettingError(f"view_grace must be >= 0 seconds, got {view_grace!r}")
        #: Seconds a buffer rests after it stopped being the published one before it
        #: is written again (see :meth:`publish`).
        self.view_grace = view_grace
        #: Buffers per data segment: a third one with a grace, so that back-to-back
        #: publications wait for it only when two come within the grace (measured in
        #: bench/scenarios/visibility.py).
        self.buffers = 3 if view_grace else 2
        #: What :meth:`close` (and leaving a ``with`` block) does when not told: remove the segments?
        self.unlink_on_close = unlink_on_close
        self.mode = trust.check_mode(mode)
        self.gid = gid
        self.uid = os.geteuid() if uid is None else trust.resolve_uid(uid, "uid to publish for")
        self.shm_name = ctrl_name(name)
        self._remedy = _unlink_hint(name, self.shm_name) + " or choose another --name"
        self._lock_fd, lock_created = self._take_lock()
        try:
            self._open_control(lock_created)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _take_lock(self) -> Tuple[int, bool]:
        """Open (or create, 0600) the lock file and take ``flock(LOCK_EX)``: (fd, created).

        The lock lives in its own file that only this uid (and root) can open, not
        on a segment readers map: a reader holding any lock on any segment cannot
        stop a writer (issue 21). The kernel drops the lock when the process dies,
        even on SIGKILL, so a restarted writer takes over without cleanup. A brief
        probe (:func:`writer_is_running`) may hold a shared lock: retried for 0.2 s.
        A file that was unlinked while we waited for it (``unlink``) is opened again.
        """
        path = lock_path(self.name)
        what = f"snapshot {self.name!r}: writer lock file"
        remedy = f"remove it (as root or its owner: rm {path}) or choose another --name"
        for _ in range(5):
            fd, created = trust.open_owned(path, 0o600, self.uid, what=what, remedy=remedy)
            try:
                if self.uid != os.geteuid():
                    os.fchown(fd, self.uid, -1)
                os.fchmod(fd, 0o600)
                deadline = time.monotonic() + 0.2
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise WriterExistsError(
                                f"snapshot {self.name!r} already has a live writer (pid {_peek_pid(self.shm_name)}); "
                                "stop it first or choose another --name"
                            ) from None
                        time.sleep(0.01)
                if _same_file(fd, path):
                    self._lock_id = _file_id(os.fstat(fd))
                    return fd, created
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # unlinked (or replaced) while we waited: lock what is there now
        raise WriterExistsError(f"snapshot {self.name!r}: its lock file {path} keeps being replaced")

    def _open_control(self, lock_created: bool) -> None:
        try:
            self._ctrl_fd, _ = trust.open_owned(
                shm_path(self.shm_name),
                self.mode,
                self.uid,
                what=f"snapshot {self.name!r}: control segment",
                remedy=self._remedy,
            )
        except UntrustedSegmentError:
            raise
        except PermissionError as exc:
            raise SegmentPermissionError(
                errno.EACCES, f"cannot open {self.shm_name}: {os.strerror(exc.errno or errno.EACCES)}"
            ) from None
        try:
            self._secure(self._ctrl_fd)
            if os.fstat(self._ctrl_fd).st_size < CTRL_SIZE:
                os.ftruncate(self._ctrl_fd, CTRL_SIZE)
            self.ctrl: Optional[mmap.mmap] = mmap.mmap(
                self._ctrl_fd, CTRL_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self._ctrl_fd)
            raise
        self._ctrl_id = _file_id(os.fstat(self._ctrl_fd))
        self._words = memoryview(self.ctrl).cast("Q")
        self._seq_addr = futex.address(self.ctrl, OFF_SEQ)
        magic, version, _ = _CTRL_HEAD.unpack_from(self.ctrl, 0)
        if magic != CTRL_MAGIC or version != LAYOUT_VERSION:
            # Fresh (or foreign/old) control block: start clean. Nobody can be
            # reading a valid snapshot from it, so no seqlock is needed.
            self.ctrl[:] = bytes(CTRL_SIZE)
            _CTRL_HEAD.pack_into(self.ctrl, 0, CTRL_MAGIC, LAYOUT_VERSION, 0)
        elif lock_created and self._predecessor_alive():
            # The lock file was missing (removed by hand, or an older shmkeyspace
            # that locked the control segment) while a writer still beats here.
            pid = self._words[OFF_PID // 8]
            self.close_quietly()
            raise WriterExistsError(
                f"snapshot {self.name!r} already has a live writer (pid {pid}: its heartbeat advances, "
                f"but its lock file {lock_path(self.name)} is gone); stop it first or choose another --name"
            )
        self.seq = self._words[OFF_SEQ // 8]
        #: The predecessor's last complete publication (None: none, or a fresh block):
        #: a restarted writer may take its image over instead of publishing an older one.
        self.previous: Optional[Published] = self._read_published(self.seq)
        if self._words[OFF_FLAGS // 8] & FLAG_RETIRED:
            self.previous = None  # retired (its writer lost the name): not ours to continue
        recs = [RECORD.unpack_from(self.ctrl, OFF_RECORDS + i * RECORD.size) for i in (0, 1)]
        # Take over from a previous writer in a new generation; its segments go
        # once readers have been moved off them.
        self._stale_gens = sorted({r[0] for r in recs if r[0]})
        self.gen = max(self._stale_gens, default=0)
        self._data: Optional[mmap.mmap] = None
        self._data_fd = -1  # kept open to reserve buffer 1 when it is first written (_reserve)
        self._last_length = 0  # of the last image published
        self._published_gen = 0  # the generation of the last publication
        nb = self.buffers
        self._reserved = [0] * nb  # bytes of each buffer reserved (from its start)
        self._data_size = 0
        self._buf_size = 0
        self._active_buf = nb - 1  # so the first publication goes to buffer 0
        # Per buffer: (gen, token, start, end) of the stable span it holds, or None.
        self._written: List[Optional[Tuple[Any, int, int, int]]] = [None] * nb
        # Per buffer: (gen, reuse token) of the image it holds, or None.
        self._held: List[Optional[Tuple[int, Any]]] = [None] * nb
        # Per buffer: monotonic ns when it stopped being the published one (0: never was).
        self._retired_ns = [0] * nb
        #: Seconds publications waited for a view grace to run out, and how often.
        self.grace_waits = 0
        self.grace_wait_seconds = 0.0
        # What the next publications say of themselves (record extension): nothing
        # until set_identity() says, but the epoch continues.
        prev = self.previous
        self._ext = (0, 0, prev.epoch if prev else 0, 0)
        self._words[OFF_FLAGS // 8] = 0
        self._words[OFF_PID // 8] = os.getpid()
        self._words[OFF_STARTED // 8] = time.time_ns()
        self._words[OFF_PIDNS // 8] = pid_namespace()
        self._words[OFF_VIEW_GRACE // 8] = int(self.view_grace * 1e9)
        # This writer has not heard from etcd yet, nor said where its data comes
        # from: a predecessor's contact and source say nothing about it.
        self._words[OFF_CONTACT // 8] = 0
        self._words[OFF_SOURCE // 8] = SOURCE_UNKNOWN
        self._words[OFF_ETCD_REV // 8] = prev.revision if prev is not None else 0
        self._words[OFF_STALE_AFTER // 8] = 0
        for off in (
            OFF_PERSISTS,
            OFF_PERSIST_FAILURES,
            OFF_PERSIST_NS,
            OFF_PERSIST_FAIL_NS,
            OFF_LOAD_STATE,
            OFF_LOAD_KEYS,
            OFF_LOAD_RETRIES,
            OFF_LOAD_RESTARTS,
        ):
            self._words[off // 8] = 0
        self.heartbeat()

    def _predecessor_alive(self) -> bool:
        """True if the control block's writer looks alive: a pid, and a heartbeat that advances.

        Waits up to three of its heartbeat intervals (at most 3 s) for the heartbeat
        to move; only asked when the lock file had to be created.
        """
        w = self._words
        if not w[OFF_PID // 8] or not w[OFF_HEARTBEAT // 8]:
            return False
        interval = min(1.0, max(0.05, w[OFF_HB_INTERVAL // 8] / 1e9 or 0.5))
        hb = w[OFF_HEARTBEAT // 8]
        if (time.monotonic_ns() - hb) / 1e9 > max(2.0, 5 * interval):
            return False
        deadline = time.monotonic() + 3 * interval
        while time.monotonic() < deadline:
            time.sleep(interval / 4)
            if w[OFF_HEARTBEAT // 8] != hb:
                return True
        return False

    def _read_published(self, seq: int) -> Optional[Published]:
        """The last complete publication at seq value ``seq`` (odd: one was in progress)."""
        if seq < 2:
            return None
        slot = ((seq & ~1) >> 1) & 1
        assert self.ctrl is not None
        rec = RECORD.unpack_from(self.ctrl, OFF_RECORDS + slot * RECORD.size)
        ext = RECORD_EXT.unpack_from(self.ctrl, OFF_RECORD_EXT + slot * RECORD_EXT.size)
        if not rec[0]:
            return None
        return Published(*rec, *ext)

    def set_identity(self, cluster_id: int, ident: int, epoch: int, excluded: int = 0) -> None:
        """What the next publications say of themselves: etcd cluster, :func:`identity`, epoch,
        keys left out. O(1)."""
        self._ext = (cluster_id, ident, epoch, excluded)

    @property
    def epoch(self) -> int:
        """The history epoch the next publication carries (see OFF_RECORD_EXT)."""
        return self._ext[2]

    def open_previous(self) -> "DataView":
        """Map the predecessor's data segment holding :attr:`previous` (read-only; close it).

        Refuses (UntrustedSegmentError) one not owned by this writer's uid.
        """
        prev = self.previous
        if prev is None:
            raise SegmentNotFoundError(f"snapshot {self.name!r}: no previous publication to take over")
        return DataView(self.name, prev.gen, prev.seg_size, owner_uid=self.uid)

    def lost(self) -> str:
        """Why this writer no longer owns the name ("" if it does): two stats. ~3 us.

        The control segment and the lock file must still be the files this writer
        opened: ``rm`` of either (or a file put in their place) means another writer
        could start on the name, so this one must stop.
        """
        for path, own, what in (
            (shm_path(self.shm_name), self._ctrl_id, "control segment"),
            (lock_path(self.name), self._lock_id, "writer lock file"),
        ):
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return f"its {what} {path} was removed"
            except OSError as exc:
                return f"its {what} {path} cannot be inspected ({os.strerror(exc.errno or 0)})"
            if _file_id(st) != own:
                return f"its {what} {path} was replaced by another file ({trust.describe(st)})"
        return ""

    def check_owner(self) -> None:
        """Raise WriterLostError, after retiring the block, if :meth:`lost` gives a reason."""
        reason = self.lost()
        if reason:
            self.retire()
            raise WriterLostError(
                f"snapshot {self.name!r}: {reason} while this writer (pid {os.getpid()}) ran; it stops "
                "publishing so that two writers never serve one name (restart it to publish again)"
            )

    def retire(self) -> None:
        """Tell readers this control segment is no longer the name's (before it is unlinked). Idempotent.

        Sets FLAG_RETIRED and republishes the active record under the seqlock (the
        same image: nothing older becomes visible), which wakes waiters and moves
        seq, so readers notice at their next query and re-open the name.
        """
        if self.ctrl is None or self._words[OFF_FLAGS // 8] & FLAG_RETIRED:
            return
        _retire(self.ctrl, self._words, self._seq_addr)
        self.seq = self._words[OFF_SEQ // 8]

    def close_quietly(self) -> None:
        """Release the control mapping without touching its words (a refused start)."""
        if self.ctrl is not None:
            self._words.release()
            self.ctrl.close()
            self.ctrl = None
            os.close(self._ctrl_fd)

    # -- helpers --------------------------------------------------------------
    def _secure(self, fd: int) -> None:
        # shm_open's mode is filtered by the umask: set it explicitly.
        uid = self.uid if self.uid != os.geteuid() else -1
        if self.gid is not None or uid != -1:
            os.fchown(fd, uid, -1 if self.gid is None else self.gid)
        os.fchmod(fd, self.mode)

    def set_persist_stats(self, persists: int, failures: int, ok_ns: int, fail_ns: int) -> None:
        """Publish the state-file counters (writes, failures, wall ns of the last of each). O(1)."""
        w = self._words
        try:
            w[OFF_PERSISTS // 8] = persists
            w[OFF_PERSIST_FAILURES // 8] = failures
            w[OFF_PERSIST_NS // 8] = ok_ns
            w[OFF_PERSIST_FAIL_NS // 8] = fail_ns
        except ValueError:  # released by close()
            pass

    def set_load_status(self, state: str, keys: int, retries: int, restarts: int) -> None:
        """Publish the full load's state ("idle", "loading", "waiting") and counters. O(1)."""
        codes = {v: k for k, v in LOAD_STATE_NAMES.items()}
        w = self._words
        try:
            w[OFF_LOAD_STATE // 8] = codes.get(state, LOAD_IDLE)
            w[OFF_LOAD_KEYS // 8] = keys
            w[OFF_LOAD_RETRIES // 8] = retries
            w[OFF_LOAD_RESTARTS // 8] = restarts
        except ValueError:  # released by close()
            pass

    def heartbeat(self, etcd_revision: Optional[int] = None) -> None:
        """Beat (CLOCK_MONOTONIC ns), and raise the newest etcd revision heard of to ``etcd_revision``.

        That word never decreases while this writer runs (two threads beat, one
        knowing less), and starts at the predecessor's published revision.
        """
        self._words[OFF_HEARTBEAT // 8] = time.monotonic_ns()
        if etcd_revision is not None and etcd_revision > self._words[OFF_ETCD_REV // 8]:
            self._words[OFF_ETCD_REV // 8] = etcd_revision

    def reset_etcd_revision(self, revision: int) -> None:
        """Set the newest-etcd-revision word to ``revision``, even lower (a reset etcd history)."""
        self._words[OFF_ETCD_REV // 8] = revision

    def set_heartbeat_interval(self, seconds: float) -> None:
        self._words[OFF_HB_INTERVAL // 8] = int(seconds * 1e9)

    def set_source(self, source: int) -> None:
        """Say where the published data came from (SOURCE_DISK / SOURCE_ETCD). O(1).

        One aligned 8-byte store; readers read it with the heartbeat, outside
        the seqlock (it describes the writer's progress, not one publication).
        """
        if source not in SOURCE_NAMES:
            raise InvalidSettingError(f"unknown snapshot source {source!r}")
        self._words[OFF_SOURCE // 8] = source

    @property
    def source(self) -> int:
        """The value last given to :meth:`set_source` (SOURCE_UNKNOWN if none). O(1)."""
        return self._words[OFF_SOURCE // 8] if self.ctrl is not None else SOURCE_UNKNOWN

    def set_stale_after(self, seconds: float) -> None:
        """Publish the writer's stale_after: readers call it stale past this contact age."""
        self._words[OFF_STALE_AFTER // 8] = int(seconds * 1e9)

    def set_contact(self, monotonic_ns: Optional[int] = None) -> None:
        """Record the writer's last contact with etcd (default: now). One aligned 8-byte store.

        Safe from any thread, also racing :meth:`close` (then it does nothing).
        """
        words = self._words
        try:
            words[OFF_CONTACT // 8] = time.monotonic_ns() if monotonic_ns is None else monotonic_ns
        except ValueError:  # released by close()
            pass

    # -- data segments ----------------------------------------------------------
    def _new_generation(self, need: int) -> None:
        buf_size = max(1 << 20, _round_up(need * 2, PAGE))
        seg_size = PAGE + self.buffers * buf_size
        gen = self.gen + 1
        shm_name = data_name(self.name, gen)
        # A leftover (a crashed writer's, or anyone's) is unlinked and the name
        # created again exclusively: never write into a file someone else may hold.
        fd = trust.create_fresh(
            shm_path(shm_name),
            self.mode,
            what=f"snapshot {self.name!r}: data segment",
            remedy=_unlink_hint(self.name, shm_name) + " or choose another --name",
        )
        try:
            self._secure(fd)
            try:
                # Reserve pages before writing them: writing to a sparse tmpfs
                # file that cannot grow is a SIGBUS, an ENOSPC here is an
                # exception. The header page and what the next publication
                # writes into buffer 0 now; the rest of each buffer before a
                # publication first needs it (_reserve). Zeroing both whole
                # buffers up front (4x the image) was 0.21 s of a 1M-key warm
                # start's first publication (measured).
                os.ftruncate(fd, seg_size)
                os.posix_fallocate(fd, 0, PAGE + _round_up(need, PAGE))
            except OSError as exc:
                _unlink_quiet(shm_name)  # ours: in sticky /dev/shm nobody else could replace it
                raise SegmentFullError(
                    exc.errno or errno.ENOSPC,
                    f"no room for a {seg_size >> 20} MiB snapshot segment {shm_name} "
                    f"in shared memory ({os.strerror(exc.errno or errno.ENOSPC)}); "
                    "the last published snapshot stays in place",
                ) from None
            mm = mmap.mmap(fd, seg_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        nb = self.buffers
        _DATA_HEAD.pack_into(mm, 0, DATA_MAGIC, LAYOUT_VERSION, nb, gen, seg_size, buf_size, PAGE)
        old, old_fd = self._data, self._data_fd
        self._data, self._data_size, self._buf_size, self.gen = mm, seg_size, buf_size, gen
        self._data_fd = fd
        self._reserved = [_round_up(need, PAGE)] + [0] * (nb - 1)
        self._written = [None] * nb
        self._held = [None] * nb
        self._retired_ns = [0] * nb  # no reader has seen any buffer of this generation
        self._active_buf = nb - 1
        if old_fd >= 0:
            os.close(old_fd)
        if old is not None:
            self._stale_gens.append(gen - 1)
            old.close()

    def reserve_spare(self) -> None:
        """Prepare the buffer the next publication writes: reserve its pages, map them in.

        Takes the next publication's fixed costs off its path, e.g. while other
        work runs: zeroing the buffer's pages (fallocate, ~0.1 s per 300 MB)
        and faulting the first (last image's length + 1/8) of them into this
        process (MADV_POPULATE_WRITE, Linux >= 5.14; 155 MB: ~0.15 s of page
        faults the copy no longer takes). Both run in the kernel with the GIL
        released. Raises SegmentFullError. Not thread-safe, like
        :meth:`publish`: callers serialize the two.
        """
        buf = self._next_buf()
        if self._data is None:
            return
        n = self._last_length + (self._last_length >> 3)
        if n > self._reserved[buf]:
            self._reserve(buf, n)
        _populate(self._data, PAGE + buf * self._buf_size, self._reserved[buf])

    def _reserve(self, buf: int, need: int) -> None:
        """Allocate buffer ``buf``'s pages up to ``need`` bytes (+1/8, for growth) before they are written.

        Raises SegmentFullError when /dev/shm is full; nothing changes then.
        """
        have = self._reserved[buf]
        upto = min(self._buf_size, _round_up(need + (need >> 3), PAGE))
        try:
            os.posix_fallocate(self._data_fd, PAGE + buf * self._buf_size + have, upto - have)
        except OSError as exc:
            raise SegmentFullError(
                exc.errno or errno.ENOSPC,
                f"no room for {(upto - have) >> 20} MiB more of snapshot segment "
                f"{data_name(self.name, self.gen)} in shared memory "
                f"({os.strerror(exc.errno or errno.ENOSPC)}); the last published snapshot stays in place",
            ) from None
        self._reserved[buf] = upto

    def publish(
        self,
        parts,
        length: int,
        revision: int,
        count: int,
        stable: Optional[Tuple[Any, int, int]] = None,
        feed: bytes = b"",
        reuse: Optional[Tuple[Any, Callable[[Any], Optional[List[Tuple[int, int]]]]]] = None,
    ) -> None:
        """Publish the image made of ``parts`` (bytes-like, ``length`` bytes in all).

        ``stable = (token, start, end)`` is the caller's promise that any two
        images published with an equal token agree on bytes
        ``[start, min(end, other end))`` (ImageBuilder's append-only arena). The
        part of that span already in the target buffer is not copied again, so
        a 1-key change at 100k x 1 KB costs ~1 ms instead of a 100 MB memcpy.
        ``reuse = (token, unchanged)`` (ImageBuilder.reuse) generalises that:
        ``unchanged(token of the image a buffer holds)`` lists byte ranges of
        this image that buffer already has right (None: unknown), so a 1-key
        change at 1M keys skips the 40 MB of hash table and order it would
        otherwise copy.
        ``feed`` (the change feed region, feed.py) is written after the image in
        the same buffer. After the seq store, waiters on the seq word are woken
        (one futex syscall, ~1-4 us even with nobody waiting).
        Raises SegmentFullError (and publishes nothing) when shared memory is full.
        """
        self.check_owner()
        need = feed_offset(length) + len(feed) if feed else length
        if self._data is None or need > self._buf_size:
            self._new_generation(need)
        buf = self._next_buf()
        off = PAGE + buf * self._buf_size
        if need > self._reserved[buf]:
            self._reserve(buf, need)  # before the odd seq: a failure publishes nothing and changes nothing
        self._rest(buf)
        seq = self.seq
        if seq % 2 == 0:
            seq += 1
            self._store_seq(seq)
        skip_lo = skip_hi = 0
        had = self._written[buf]
        if stable is not None and had is not None and had[:3] == (self.gen, stable[0], stable[1]):
            skip_lo, skip_hi = stable[1], min(had[3], stable[2])
        skips = [(skip_lo, skip_hi)] if skip_hi > skip_lo else []
        held = self._held[buf]
        if reuse is not None and held is not None and held[0] == self.gen:
            same = reuse[1](held[1])
            if same:
                skips += same
        self._written[buf] = None  # unknown until this copy completes
        self._held[buf] = None
        data = self._data
        assert data is not None
        pos = _copy_parts(data, off, parts, sorted(skips))
        if pos != length:
            raise AssertionError(f"image length {pos} != {length}")
        if stable is not None:
            self._written[buf] = (self.gen, stable[0], stable[1], stable[2])
        if reuse is not None:
            self._held[buf] = (self.gen, reuse[0])
        self._commit(buf, off, seq, length, revision, count, feed)

    def _next_buf(self) -> int:
        """The buffer the next publication writes: the next in strict rotation, which is
        the one readers left longest ago (views count on the rotation: DataView.buffers)."""
        return (self._active_buf + 1) % self.buffers

    def _rest(self, buf: int) -> None:
        """Wait until buffer ``buf`` has rested :attr:`view_grace` since it was retired.

        A SnapshotView reads the published buffer until the writer starts
        rewriting it, :attr:`buffers` publications later; with the grace that is
        never sooner than ``view_grace`` after the view's buffer stopped being the
        published one, so every view lives at least that long. With the third
        buffer a publication waits only when two publications came within the
        grace: back-to-back updates are then spaced by half the grace (measured:
        bench/scenarios/visibility.py). Memory: one more buffer (lazily reserved,
        as far as used: about one more image in /dev/shm).
        """
        if not self.view_grace or not self._retired_ns[buf]:
            return
        wait = self._retired_ns[buf] / 1e9 + self.view_grace - time.monotonic()
        if wait > 0:
            self.grace_waits += 1
            self.grace_wait_seconds += wait
            time.sleep(wait)

    def publish_from(
        self,
        length: int,
        fill: Callable[[memoryview, int], None],
        revision: int,
        count: int,
        feed: bytes = b"",
    ) -> None:
        """Publish an image that ``fill(view, offset)`` writes into shared memory itself.

        ``fill`` gets a writable view of this writer's whole data mapping and
        the offset where the ``length``-byte image goes, in a new generation
        (always: no reader can map it before this publication names it, so it
        is written before the seqlock is taken), and may raise: then nothing
        is published, the last snapshot stays, and the next publication writes
        over the buffer. For a state file (state.Opened.read_image): the file
        is read into shared memory and validated there, with no private copy
        (at 1M keys a 150 MB copy and its page faults, ~0.1 s of a warm start).
        """
        self.check_owner()
        need = feed_offset(length) + len(feed) if feed else length
        self._new_generation(need)
        buf = self._next_buf()
        off = PAGE + buf * self._buf_size
        self._written[buf] = self._held[buf] = None
        assert self._data is not None
        with memoryview(self._data) as view:
            fill(view, off)
        seq = self.seq
        if seq % 2 == 0:
            seq += 1
            self._store_seq(seq)
        self._commit(buf, off, seq, length, revision, count, feed)

    def published(self) -> Tuple[memoryview, int, int]:
        """``(view, offset, length)``: the image this writer last published, to read it back.

        ``view`` covers the whole data mapping (so ImageView works on it
        without a copy); release it before the next publication. The image
        holds still until then: only this writer writes, and not this buffer
        (a publication writes the other one).
        """
        if self._data is None or self._published_gen != self.gen:
            raise SegmentNotFoundError(
                f"snapshot {self.name!r}: this writer has published nothing in its current generation"
            )
        return memoryview(self._data), PAGE + self._active_buf * self._buf_size, self._last_length

    def _commit(
        self, buf: int, off: int, seq: int, length: int, revision: int, count: int, feed: bytes
    ) -> None:
        """The end of a publication: the feed, the record, the even seq, the wake-up."""
        data = self._data
        assert data is not None
        if feed:
            # After the image, outside the stable span (which ends inside the image).
            foff = off + feed_offset(length)
            data[foff : foff + len(feed)] = feed
        slot = ((seq >> 1) + 1) & 1
        assert self.ctrl is not None, "publish on a closed Publisher"
        RECORD.pack_into(
            self.ctrl,
            OFF_RECORDS + slot * RECORD.size,
            self.gen,
            self._data_size,
            off,
            length,
            revision,
            count,
            time.time_ns(),
            len(feed),
        )
        RECORD_EXT.pack_into(self.ctrl, OFF_RECORD_EXT + slot * RECORD_EXT.size, *self._ext)
        self._store_seq(seq + 1)
        futex.wake(self._seq_addr)
        if self._published_gen == self.gen:
            self._retired_ns[self._active_buf] = time.monotonic_ns()  # the buffer readers leave now
        self._active_buf = buf
        self._last_length = length
        self._published_gen = self.gen
        if self._stale_gens and self._stale_gens != [self.gen]:
            for g in self._stale_gens:
                if g != self.gen:
                    _unlink_quiet(data_name(self.name, g))
            self._stale_gens = []

    def _store_seq(self, seq: int) -> None:
        # Barriers on both sides (they matter on aarch64, cost ~0.2 us here): the
        # buffer and record stores before an even seq must be visible first, and
        # an odd seq must be visible before the buffer is touched, or a reader
        # could see new bytes under an old seq.
        fence()
        self._words[OFF_SEQ // 8] = seq
        fence()
        self.seq = seq

    def close(self, unlink: Optional[bool] = None) -> None:
        """Release the writer lock; with ``unlink``, remove every segment of the name.

        ``unlink`` defaults to ``unlink_on_close`` (False unless asked): the last
        snapshot stays readable and readers see the writer as dead; a new writer
        takes over in place. Idempotent.
        """
        if self.ctrl is None:
            return
        if unlink is None:
            unlink = self.unlink_on_close
        self._words[OFF_PID // 8] = 0
        if unlink and self.lost():
            # Another writer may own what the paths name now: remove nothing.
            self.retire()
            unlink = False
        if unlink:
            # Retired first: a reader re-opens the name instead of staying on this
            # block, where no writer will publish again (issue 25).
            self.retire()
            _unlink_quiet(self.shm_name)
            for g in set(self._stale_gens + [self.gen]):
                if g:
                    _unlink_quiet(data_name(self.name, g))
            if _same_file(self._lock_fd, lock_path(self.name)):
                _unlink_path_quiet(lock_path(self.name))  # still holding it: nobody waits on a ghost
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        self._words.release()
        self.ctrl.close()
        self.ctrl = None
        os.close(self._ctrl_fd)
        os.close(self._lock_fd)  # closing the fd drops the flock

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def writer_lock_held(name: str) -> Optional[bool]:
    """Whether a process holds the writer lock of ``name``: True, False, or None (cannot tell).

    As the writer's uid or root: a shared-lock probe of the lock file (definitive).
    Otherwise (a reader of another uid cannot open it): the lock is looked up in
    /proc/locks by the file's device and inode; not found there is definitive only
    when the writer runs in this PID namespace (the kernel lists only locks of
    processes this namespace can see), else None. A syscall or two: not hot.
    """
    path = lock_path(name)
    try:
        fd = trust.open_nofollow(path, os.O_RDONLY, what="writer lock file", remedy="")
    except (FileNotFoundError, UntrustedSegmentError):
        return False
    except PermissionError:
        return _proc_locks_hold(name, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops our shared lock too
    return False


def _proc_locks_hold(name: str, path: str) -> Optional[bool]:
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        f_ = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF" (blocked waiters have "->")
        if len(f_) >= 6 and f_[1] == "FLOCK" and f_[3] == "WRITE" and f_[5] == want:
            return True
    try:
        with ControlView(name) as ctrl:
            ns = ctrl.words[OFF_PIDNS // 8]
    except Exception:
        return None
    return False if ns and ns == pid_namespace() else None


def writer_is_running(name: str) -> bool:
    """True iff a writer holds the lock of ``name`` (:func:`writer_lock_held`; not hot).

    Where this process cannot tell (None), a writer counts as running while the
    control block shows a pid and a heartbeat younger than five intervals (2 s at least).
    """
    held = writer_lock_held(name)
    if held is not None:
        return held
    try:
        with ControlView(name) as ctrl:
            w = ctrl.words
            pid, hb, interval = w[OFF_PID // 8], w[OFF_HEARTBEAT // 8], w[OFF_HB_INTERVAL // 8] / 1e9
    except Exception:
        return False
    return bool(pid and hb) and (time.monotonic_ns() - hb) / 1e9 < max(2.0, 5 * (interval or 0.5))


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


def unlink_all(name: str) -> int:
    """Remove the control segment, every data generation and the lock file of ``name``.

    Refuses (WriterExistsError) while a writer holds the lock; holds the lock
    itself meanwhile, so no writer starts half-way. The control segment is
    retired first (where this process may write it), so readers re-open the name
    when a writer starts again. Returns the number of segments removed.
    """
    path = lock_path(name)
    try:
        fd = trust.open_nofollow(path, os.O_RDONLY, what="writer lock file", remedy="")
    except (FileNotFoundError, UntrustedSegmentError):
        fd = -1
    except PermissionError:
        raise SegmentPermissionError(
            errno.EACCES, f"snapshot {name!r}: no permission to open its writer lock file {path}"
        ) from None
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                st = os.fstat(fd)
                if st.st_uid not in trust.trusted_writer_uids():
                    # A squatter can lock its own file: say whose it is rather than
                    # send the user looking for a writer that does not exist.
                    raise WriterExistsError(
                        f"snapshot {name!r}: a process holds the writer lock file {path}, which is "
                        f"{trust.describe(st)}, not a writer this user trusts: stop that process, or if "
                        f"the file is not your writer's, remove it with rm {path}"
                    ) from None
                raise WriterExistsError(
                    f"snapshot {name!r} has a running writer: stop it before unlinking"
                ) from None
        _retire_path(shm_path(ctrl_name(name)))
        removed = 0
        for shm_name, gen in segment_files(name):
            if gen:
                removed += _unlink_quiet(shm_name)
        removed += _unlink_quiet(ctrl_name(name))
        if fd >= 0 and _same_file(fd, path):
            _unlink_path_quiet(path)
        return removed
    finally:
        if fd >= 0:
            os.close(fd)


def _retire_path(path: str) -> None:
    """Retire the control segment at ``path`` if this process may write it (best effort)."""
    try:
        fd = trust.open_nofollow(path, os.O_RDWR, what="control segment", remedy="")
    except (OSError, UntrustedSegmentError):
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < CTRL_SIZE:
            return
        mm = mmap.mmap(fd, CTRL_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return
    finally:
        os.close(fd)
    try:
        if _CTRL_HEAD.unpack_from(mm, 0)[:2] == (CTRL_MAGIC, LAYOUT_VERSION):
            with memoryview(mm) as raw, raw.cast("Q") as words:
                _retire(mm, words, futex.address(mm, OFF_SEQ))
    finally:
        mm.close()


def _retire(ctrl: Any, words: Any, seq_addr: int) -> None:
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


def _file_id(st: os.stat_result) -> Tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _same_file(fd: int, path: str) -> bool:
    """True if ``path`` (not followed) names the file open as ``fd``."""
    try:
        return _file_id(os.stat(path, follow_symlinks=False)) == _file_id(os.fstat(fd))
    except OSError:
        return False


def _peek_pid(shm_name: str) -> int:
    """The PID word of a control segment (0 if unreadable): for error messages only."""
    try:
        with open(shm_path(shm_name), "rb") as f:
            f.seek(OFF_PID)
            return U64.unpack(f.read(8))[0]
    except (OSError, struct.error):
        return 0


def _unlink_path_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


try:
    _madvise: Any = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - exotic libc
    _madvise = None
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux >= 5.14


def _populate(mm: mmap.mmap, off: int, length: int) -> bool:
    """Fault ``mm[off:off+length]`` in for writing (``off`` page-aligned); False if unsupported.

    Through ctypes, which releases the GIL for the call. Only a hint: an old
    kernel (EINVAL) or anything else unexpected is ignored, and the copy then
    takes the faults itself.
    """
    addr = futex.address(mm, off) if _madvise is not None and length > 0 else 0
    return bool(addr) and _madvise(addr, length, _MADV_POPULATE_WRITE) == 0


def _unlink_quiet(shm_name: str) -> int:
    try:
        posix_ipc.unlink_shared_memory(shm_name)
        return 1
    except posix_ipc.ExistentialError:
        return 0


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _copy_parts(data: Any, off: int, parts: Any, skips: List[Tuple[int, int]]) -> int:
    """Copy ``parts`` end to end into ``data[off:]`` except the (sorted) ``skips`` ranges.

    Returns the length of the parts. Skip ranges may overlap or be empty.
    """
    pos = 0
    k = 0
    for p in parts:
        end = pos + len(p)
        mv = None
        cur = pos
        while cur < end:
            while k < len(skips) and skips[k][1] <= cur:
                k += 1
            if k < len(skips) and skips[k][0] <= cur:
                cur = min(end, skips[k][1])  # inside a skip: jump over it
                continue
            stop = end if k >= len(skips) else min(end, skips[k][0])
            if cur == pos and stop == end:
                data[off + pos : off + end] = p
            else:
                if mv is None:
                    mv = memoryview(p).cast("B")
                data[off + cur : off + stop] = mv[cur - pos : stop - pos]
            cur = stop
        if mv is not None:
            mv.release()
        pos = end
    return pos
