"""The writer's side of one snapshot name: :class:`Publisher`.

Owns the writer's mappings of the control and data segments (layout in
segment.py), the data generations it creates and unlinks, the buffer rotation and
the view grace, and the copy of an image into the buffer readers are not reading.
It holds the writer lock (writerlock.py) from construction to close.

Promises: a publication is all or nothing for readers (the writer half of the
seqlock, segment.store_seq); a full /dev/shm is an exception before anything
changes (SegmentFullError), never a SIGBUS; a buffer is rewritten no sooner than
``view_grace`` after readers left it; a writer whose control segment or lock file
was removed retires its block and stops (WriterLostError).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from typing import Any, Callable, List, Optional, Tuple, Union

from . import futex, segment, trust, writerlock
from .errors import (
    InvalidSettingError,
    SegmentFullError,
    SegmentNotFoundError,
    SegmentPermissionError,
    UntrustedSegmentError,
    WriterExistsError,
    WriterLostError,
)
from .segment import (
    CTRL_MAGIC,
    CTRL_SIZE,
    DATA_MAGIC,
    FLAG_RETIRED,
    LAYOUT_VERSION,
    OFF_CONTACT,
    OFF_ETCD_REV,
    OFF_FLAGS,
    OFF_HB_INTERVAL,
    OFF_HEARTBEAT,
    OFF_LOAD_KEYS,
    OFF_LOAD_RESTARTS,
    OFF_LOAD_RETRIES,
    OFF_LOAD_STATE,
    OFF_PERSIST_FAIL_NS,
    OFF_PERSIST_FAILURES,
    OFF_PERSIST_NS,
    OFF_PERSISTS,
    OFF_PID,
    OFF_PIDNS,
    OFF_RECORD_EXT,
    OFF_RECORDS,
    OFF_SEQ,
    OFF_SOURCE,
    OFF_STALE_AFTER,
    OFF_STARTED,
    OFF_VIEW_GRACE,
    PAGE,
    RECORD,
    RECORD_EXT,
    SOURCE_NAMES,
    SOURCE_UNKNOWN,
    DataView,
    Published,
    ctrl_name,
    data_name,
    feed_offset,
    pid_namespace,
    shm_path,
    validate_name,
)
from .writerlock import lock_path


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
        self._remedy = segment.unlink_hint(name, self.shm_name) + " or choose another --name"
        self._lock_fd, lock_created, self._lock_id = writerlock.take_lock(self.name, self.uid)
        try:
            self._open_control(lock_created)
        except BaseException:
            os.close(self._lock_fd)
            raise

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
        self._ctrl_id = segment.file_id(os.fstat(self._ctrl_fd))
        self._words = memoryview(self.ctrl).cast("Q")
        self._seq_addr = futex.address(self.ctrl, OFF_SEQ)
        magic, version, _ = segment.CTRL_HEAD.unpack_from(self.ctrl, 0)
        if magic != CTRL_MAGIC or version != LAYOUT_VERSION:
            # Fresh (or foreign/old) control block: start clean. Nobody can be
            # reading a valid snapshot from it, so no seqlock is needed.
            self.ctrl[:] = bytes(CTRL_SIZE)
            segment.CTRL_HEAD.pack_into(self.ctrl, 0, CTRL_MAGIC, LAYOUT_VERSION, 0)
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
            if segment.file_id(st) != own:
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
        segment.retire_block(self.ctrl, self._words, self._seq_addr)
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

    def set_load_status(self, state: str, keys: int, retries: int, restarts: int) -> None:
        """Publish the full load's state ("idle", "loading", "waiting") and counters. O(1)."""
        from .segment import LOAD_IDLE, LOAD_STATE_NAMES

        codes = {v: k for k, v in LOAD_STATE_NAMES.items()}
        w = self._words
        try:
            w[OFF_LOAD_STATE // 8] = codes.get(state, LOAD_IDLE)
            w[OFF_LOAD_KEYS // 8] = keys
            w[OFF_LOAD_RETRIES // 8] = retries
            w[OFF_LOAD_RESTARTS // 8] = restarts
        except ValueError:  # released by close()
            pass

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
            remedy=segment.unlink_hint(self.name, shm_name) + " or choose another --name",
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
                segment.unlink_quiet(shm_name)  # ours: in sticky /dev/shm nobody else could replace it
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
        segment.DATA_HEAD.pack_into(mm, 0, DATA_MAGIC, LAYOUT_VERSION, nb, gen, seg_size, buf_size, PAGE)
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
                    segment.unlink_quiet(data_name(self.name, g))
            self._stale_gens = []

    def _store_seq(self, seq: int) -> None:
        # Both barriers are in store_seq (segment.py: the memory-ordering argument).
        segment.store_seq(self._words, seq)
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
            segment.unlink_quiet(self.shm_name)
            for g in set(self._stale_gens + [self.gen]):
                if g:
                    segment.unlink_quiet(data_name(self.name, g))
            writerlock.remove_lock_file(self._lock_fd, self.name)  # still holding it: nobody waits on a ghost
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
