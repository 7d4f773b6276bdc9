"""The state file: a persisted copy of one published snapshot (fail static).

Owns the on-disk format of ``DIR/NAME.snap``, both its writing and its reading::

    head     HEAD (64 B): magic, format version, head length, etcd cluster id,
             revision, image length, entry count, wall-clock ns written,
             lengths of the three strings below
    strings  snapshot name, prefix, decoder name (UTF-8)
    image    the published image (``snapshot.py``), byte for byte what readers got
    sum      xxh3-128 of everything above (16 B)

Promises:

* :func:`write` is atomic: the spare file ``.NAME.snap.spare`` (mode and group as
  the segments) is overwritten in place, fsynced, renamed over NAME.snap (whose
  old inode becomes the next spare), then DIR fsynced. A crash leaves the old
  file or the new one, never a mix (at worst a stray ``.NAME.snap.prev`` that
  :func:`remove_temps` clears); a failed write removes the spare.
* :func:`read` (and :func:`open_file` + :meth:`Opened.read_image`, which reads
  the image straight into the caller's buffer: the writer's shared memory,
  still invisible to readers) validates completely before returning anything: no symlink
  (``O_NOFOLLOW``), a regular file owned by the expected uid and writable by
  nobody else, every length bounds-checked against the file size before use,
  the checksum, the format version, name, prefix and decoder, and the image's
  own structure and index checksum (:class:`~shmkeyspace.snapshot.ImageView`).
  Any failure is a :class:`StateFileError` whose message is the reason; it never
  hangs (``O_NONBLOCK``: a FIFO planted under the name cannot block the open,
  and only regular files are read) and never reads more than the file's size.
* what a resume relies on in the entries themselves (keys sorted, unique,
  under the prefix; revisions sane and not past the file's revision) is
  checked when the writer takes the image over:
  :meth:`shmkeyspace.builder.ImageBuilder.adopt`.

Cost: reading is one ``readv`` of the file plus one xxh3 pass (~10 GB/s): a
150 MB state file (1M keys) reads and validates in about 0.15 s.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from xxhash import xxh3_128

from . import trust
from .errors import CorruptSegmentError, StateFileError, UntrustedSegmentError
from .snapshot import MAX_IMAGE, ImageView

log = logging.getLogger(__name__)
T = TypeVar("T")

MAGIC = b"SHMKSTAT"
FORMAT_VERSION = 1
# magic, format version, head length (head + strings), cluster id, revision,
# image length, count, written (wall ns), name/prefix/decoder lengths, and the
# number of keys under the prefix left out of the image (their decode failed;
# saturated at MAX_EXCLUDED; 0 in files of writers before it was recorded).
HEAD = struct.Struct("<8sIIQqQQQHHHH")
SUM_SIZE = 16
#: The excluded-key count saturates here: "this many or more".
MAX_EXCLUDED = 0xFFFF
SUFFIX = ".snap"
MAX_STRING = 4096
#: The largest file :func:`read` accepts: one maximal image plus head and strings.
MAX_FILE = HEAD.size + 3 * MAX_STRING + MAX_IMAGE + SUM_SIZE


@dataclass
class StateFile:
    """A validated state file (see :func:`read`); as :attr:`Opened.meta`, its head only (``image`` empty)."""

    path: str
    name: str
    prefix: str
    decoder: str
    cluster_id: int
    revision: int
    count: int
    written_at: float  # wall-clock seconds
    image: bytes
    #: Keys under the prefix that etcd held at ``revision`` but the image leaves out
    #: (decode failures); MAX_EXCLUDED means at least that many.
    excluded: int = 0

    def view(self) -> ImageView:
        """An :class:`ImageView` of the image (validates it again; O(index size))."""
        return ImageView(memoryview(self.image), 0, len(self.image))


def path_for(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name + SUFFIX)


def _temp_prefix(name: str) -> str:
    return f".{name}{SUFFIX}.tmp."


def _pack_head(
    name: str,
    prefix: str,
    decoder: str,
    cluster_id: int,
    revision: int,
    image_len: int,
    count: int,
    excluded: int = 0,
) -> bytes:
    strings = [s.encode("utf-8") for s in (name, prefix, decoder)]
    for what, s in zip(("name", "prefix", "decoder name"), strings):
        if len(s) > MAX_STRING:
            raise StateFileError(f"{what} of {len(s)} bytes is too long for a state file (max {MAX_STRING})")
    head_len = HEAD.size + sum(len(s) for s in strings)
    head = HEAD.pack(
        MAGIC,
        FORMAT_VERSION,
        head_len,
        cluster_id,
        revision,
        image_len,
        count,
        time.time_ns(),
        *(len(s) for s in strings),
        min(excluded, MAX_EXCLUDED),
    )
    return head + b"".join(strings)


# -- writing ---------------------------------------------------------------------

#: Chunk for copying a part that another thread may extend (see :func:`write`):
#: big enough that the write syscalls dominate, small enough that the GIL is
#: never held for long (a 4 MiB slice copy is ~0.3 ms).
CHUNK = 4 << 20


def _spare_paths(state_dir: str, name: str) -> Tuple[str, str]:
    """(spare, prev): the inode the next write overwrites, and the old file's link while it is swapped."""
    return os.path.join(state_dir, f".{name}{SUFFIX}.spare"), os.path.join(state_dir, f".{name}{SUFFIX}.prev")


def _open_spare(spare: str, final: str, mode: int) -> int:
    """A descriptor of the spare file, ours alone, to overwrite in place; created if unusable."""
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        try:
            fin = os.lstat(final)
            same = (fin.st_dev, fin.st_ino) == (st.st_dev, st.st_ino)
        except OSError:
            same = False
        # Only a regular file of ours that nothing else links to (never the
        # live NAME.snap itself) may be overwritten in place.
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1 and not same:
            return fd
        os.close(fd)
    _unlink_quiet(spare)
    return os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write(
    state_dir: str,
    name: str,
    prefix: str,
    decoder: str,
    cluster_id: int,
    revision: int,
    count: int,
    parts: List[Any],
    length: int,
    mode: int = 0o600,
    gid: Optional[int] = None,
    excluded: int = 0,
) -> str:
    """Write ``parts`` (the image, ``length`` bytes) as ``DIR/NAME.snap``, atomically.

    A part is bytes-like, or ``(bytearray, n)``: the first ``n`` bytes of a
    buffer that another thread may go on *appending to* (the builder's arena);
    those are copied out in CHUNK pieces into one reused buffer, each a single
    GIL-held memcpy, so the buffer is never exported while this thread waits
    on the disk and its owner can still resize it. Returns the path. Raises
    OSError (disk full, permissions); NAME.snap is then unchanged, and the
    partly written spare is removed (a full disk keeps no half file).

    The file is written into ``.NAME.snap.spare``, overwritten in place, then
    renamed over NAME.snap, whose old inode becomes the next spare (linked as
    ``.NAME.snap.prev`` during the swap). Reusing the pages of one inode
    instead of a new file each time (whose pages the kernel allocates, and
    frees again when the rename drops the old one) halves the CPU of a write:
    150 MB at 1M keys, ~0.07 -> ~0.04 s in the writing thread, measured; the
    state dir holds two files of the image's size. O(length) I/O plus one
    xxh3 pass.
    """
    final = path_for(state_dir, name)
    spare, prev = _spare_paths(state_dir, name)
    fd = _open_spare(spare, final, mode)
    ok = False
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # the umask filtered open's mode, or an old spare had another
        h = xxh3_128()
        head = _pack_head(name, prefix, decoder, cluster_id, revision, length, count, excluded)
        written = 0

        def out(b: Any) -> None:
            h.update(b)
            with memoryview(b) as whole:
                mv = whole
                while mv:
                    n = os.write(fd, mv)
                    mv = mv[n:]

        out(head)
        chunk = memoryview(bytearray(min(CHUNK, length)))
        for p in parts:
            if isinstance(p, tuple):
                buf, n = p
                for a in range(0, n, CHUNK):
                    m = min(n - a, CHUNK)
                    with memoryview(buf) as src:  # exported only for this copy
                        chunk[:m] = src[a : a + m]
                    out(chunk[:m])
                written += n
            else:
                out(p)
                written += len(p)
        if written != length:
            raise StateFileError(f"image parts hold {written} bytes, expected {length}")
        os.write(fd, h.digest())
        os.ftruncate(fd, len(head) + length + SUM_SIZE)  # an old spare may have been longer
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            _unlink_quiet(spare)  # a half-written spare only holds the space a full disk needs
    _unlink_quiet(prev)  # a link left by a crash mid-swap
    try:
        os.link(final, prev)
        linked = True
    except OSError:  # no file yet, or a filesystem without hard links: the old one is freed
        linked = False
    os.rename(spare, final)
    if linked:
        os.rename(prev, spare)
    _fsync_dir(state_dir)
    return final


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_temps(state_dir: str, name: str) -> int:
    """Remove ``.NAME.snap.tmp.*`` (older versions' temp files) and ``.NAME.snap.prev``
    left by a writer that died mid-write (ours only); the spare file stays.

    Call it only while holding the writer lock of ``name``: then no other
    writer can be writing one. Returns how many were removed.
    """
    removed = 0
    pre = _temp_prefix(name)
    prev = os.path.basename(_spare_paths(state_dir, name)[1])
    try:
        names = os.listdir(state_dir)
    except OSError:
        return 0
    uid = os.geteuid()
    for fn in names:
        if fn.startswith(pre) or fn == prev:
            p = os.path.join(state_dir, fn)
            try:
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
                    os.unlink(p)
                    removed += 1
            except OSError:
                pass
    return removed


def discard(state_dir: str, name: str) -> None:
    """Remove NAME.snap (after it was found bad or foreign). Never raises."""
    p = path_for(state_dir, name)
    try:
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(p)
    except OSError:
        pass


def prepare_dir(state_dir: str, mode: int = 0o700, gid: Optional[int] = None) -> str:
    """Create DIR if missing; refuse one that is not a directory we can trust.

    The directory must be owned by the writer's uid or root and writable by
    nobody else (trust.check_owned): others could replace the file between
    writes. A symlink is not followed. Returns the absolute path.
    """
    d = os.path.abspath(state_dir)
    try:
        os.makedirs(d, mode=mode, exist_ok=True)
    except OSError as exc:
        raise StateFileError(f"cannot create state dir {d}: {exc.strerror}") from None
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        # Owned by the writer (or root) and writable by nobody else: otherwise
        # someone could replace the file between two writes.
        trust.check_owned(
            st,
            d,
            {0, os.geteuid()},
            what="state dir",
            remedy="use a directory only the writer's user can write",
            kind="dir",
        )
    except UntrustedSegmentError as exc:
        raise StateFileError(str(exc)) from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise StateFileError(f"state dir {d} is not writable by uid {os.geteuid()}")
    return d


# -- reading -----------------------------------------------------------------------


class Opened:
    """An open state file whose head is checked; its image is not read yet (see :func:`open_file`).

    A context manager; :meth:`close` releases the descriptor. ``meta`` is
    the file's :class:`StateFile` (``image`` empty), ``image_len`` the image's
    size. Read the image once, with :meth:`read_image` (into a buffer of the
    caller's, e.g. shared memory: no private copy) or :meth:`read_image_bytes`.
    Either checks everything the head did not: the checksum over the whole
    file and the image's own structure; a failure is a StateFileError.
    """

    def __init__(self, fd: int, meta: StateFile, head: bytes, strings: bytes, image_len: int) -> None:
        self._fd = fd
        self.meta = meta
        self.image_len = image_len
        self._head, self._strings = head, strings

    def read_image(self, buf: memoryview, offset: int) -> ImageView:
        """Read the image into ``buf[offset:offset + image_len]``, check it, return its view.

        Raises StateFileError. ``buf`` should be a view of a whole mmap or
        bytes object: the image is then validated in place (ImageView), without
        a copy; the caller releases the returned view. One readv (GIL
        released) and one checksum pass.
        """
        n, p = self.image_len, self.meta.path
        with buf[offset : offset + n] as dest:
            got = 0
            while got < n:
                r = os.readv(self._fd, [dest[got:]])
                if r <= 0:
                    raise StateFileError(f"{p} shrank while being read")
                got += r
        return self._verify(buf, offset)

    def read_image_bytes(self) -> bytes:
        """The image as bytes, checked (raises StateFileError)."""
        image = _read_exact(self._fd, self.image_len, self.meta.path)
        with memoryview(image) as mv:
            self._verify(mv, 0).release()
        return image

    def _verify(self, buf: memoryview, offset: int) -> ImageView:
        p, n = self.meta.path, self.image_len
        digest = _read_exact(self._fd, SUM_SIZE, p)
        if os.read(self._fd, 1):
            raise StateFileError(f"{p} grew while being read")
        h = xxh3_128(self._head)
        h.update(self._strings)
        with buf[offset : offset + n] as image:
            h.update(image)
        if h.digest() != digest:
            raise StateFileError(f"{p} fails its checksum (damaged or partly written)")
        try:
            view = ImageView(buf, offset, n)
        except CorruptSegmentError as exc:
            raise StateFileError(f"{p} holds a bad image: {exc}") from None
        if view.revision != self.meta.revision or view.count != self.meta.count:
            view.release()
            raise StateFileError(f"{p}: its image disagrees with its header (revision or key count)")
        return view

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_file(
    state_dir: str,
    name: str,
    prefix: str,
    decoder: str,
    uid: Optional[int] = None,
    max_size: int = MAX_FILE,
) -> Opened:
    """Open ``DIR/NAME.snap`` and check all but its image; raise StateFileError(reason) if unusable.

    ``uid``: the owner the file must have (default: this process's effective
    uid). Raises FileNotFoundError (a plain OSError, not StateFileError) when
    there is simply no file. Reads only the head and strings; the image and
    the checksum are read and checked by :meth:`Opened.read_image`.
    """
    p = path_for(state_dir, name)
    want_uid = os.geteuid() if uid is None else uid
    remedy = "the writer ignores it and loads from etcd"
    # The trust rules shared with the segments (trust.py): O_NOFOLLOW, O_NONBLOCK
    # (a FIFO cannot hang the open), then fstat of that very descriptor.
    try:
        fd = trust.open_nofollow(p, os.O_RDONLY, what="state file", remedy=remedy)
    except FileNotFoundError:
        raise
    except UntrustedSegmentError as exc:
        raise StateFileError(str(exc)) from None
    except OSError as exc:
        raise StateFileError(f"cannot open {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        try:
            trust.check_owned(st, p, {want_uid}, what="state file", remedy=remedy)
        except UntrustedSegmentError as exc:
            raise StateFileError(str(exc)) from None
        size = st.st_size
        if size < HEAD.size + SUM_SIZE:
            raise StateFileError(f"{p} is truncated ({size} bytes)")
        if size > max_size:
            raise StateFileError(f"{p} is {size} bytes, more than any state file ({max_size})")
        # Every length is bounds-checked against the size fstat gave before
        # anything is allocated.
        head = _read_exact(fd, HEAD.size, p)
        (magic, version, head_len, cluster_id, revision, image_len, count, written, nl, pl, dl, excl) = (
            HEAD.unpack(head)
        )
        if magic != MAGIC:
            raise StateFileError(f"{p} is not a shmkeyspace state file (magic {bytes(magic)!r})")
        if version != FORMAT_VERSION:
            raise StateFileError(
                f"{p} has state format version {version}; this shmkeyspace reads {FORMAT_VERSION}"
            )
        if head_len != HEAD.size + nl + pl + dl or head_len + image_len + SUM_SIZE != size:
            raise StateFileError(f"{p} is truncated or its lengths disagree with its size ({size} bytes)")
        strings = _read_exact(fd, head_len - HEAD.size, p)
        try:
            f_name = strings[:nl].decode("utf-8")
            f_prefix = strings[nl : nl + pl].decode("utf-8")
            f_decoder = strings[nl + pl :].decode("utf-8")
        except UnicodeDecodeError:
            raise StateFileError(f"{p} has an undecodable name, prefix or decoder") from None
        if f_name != name:
            raise StateFileError(f"{p} is of snapshot {f_name!r}, not {name!r}")
        if f_prefix != prefix:
            raise StateFileError(f"{p} mirrors prefix {f_prefix!r}, not {prefix!r}")
        if f_decoder != decoder:
            raise StateFileError(f"{p} was decoded with {f_decoder!r}, not {decoder!r}")
        if cluster_id == 0 or revision <= 0:
            raise StateFileError(f"{p} has no etcd cluster id or revision")
    except BaseException:
        os.close(fd)
        raise
    meta = StateFile(p, f_name, f_prefix, f_decoder, cluster_id, revision, count, written / 1e9, b"", excl)
    return Opened(fd, meta, head, strings, image_len)


def read(
    state_dir: str,
    name: str,
    prefix: str,
    decoder: str,
    uid: Optional[int] = None,
    max_size: int = MAX_FILE,
) -> StateFile:
    """Open, check and return ``DIR/NAME.snap`` with its image; raise StateFileError(reason) if unusable.

    :func:`open_file` plus :meth:`Opened.read_image_bytes`. Raises
    FileNotFoundError when there is no file. O(file size).
    """
    with open_file(state_dir, name, prefix, decoder, uid, max_size) as f:
        image = f.read_image_bytes()
    f.meta.image = image
    return f.meta


def _read_exact(fd: int, n: int, where: str) -> bytes:
    """``n`` bytes from ``fd`` (one read for a regular file; a loop if it returns less)."""
    data = os.read(fd, n) if n else b""
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.read(fd, n - got)
        if not more:
            raise StateFileError(f"{where} shrank while being read")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def quietly(fn: Callable[..., T], state_dir: str, name: str, *args: Any) -> Tuple[Optional[T], str]:
    """``fn(state_dir, name, *args)`` (:func:`open_file` or :func:`read`), never raising.

    ``(result, "")`` or ``(None, reason)``. A missing file is ``(None, "no
    state file")``; anything else unusable is logged as a warning with its
    reason.
    """
    try:
        return fn(state_dir, name, *args), ""
    except FileNotFoundError:
        return None, "no state file"
    except StateFileError as exc:
        reason = str(exc)
    except (OSError, ValueError, MemoryError) as exc:  # an I/O error, a size we cannot allocate
        reason = f"{path_for(state_dir, name)} unreadable: {type(exc).__name__}: {exc}"
    log.warning("state file ignored: %s; loading from etcd instead", reason)
    return None, reason


def load(
    state_dir: str, name: str, prefix: str, decoder: str, uid: Optional[int] = None
) -> Tuple[Optional[StateFile], str]:
    """:func:`read`, but never raises: ``(file, "")`` or ``(None, reason)`` (see :func:`quietly`)."""
    return quietly(read, state_dir, name, prefix, decoder, uid)
