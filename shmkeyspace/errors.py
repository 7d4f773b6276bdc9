"""Exception types of shmkeyspace.

Every failure that comes from the contents of shared memory, or from the rules of
the multiprocess contract, is raised as a subclass of :class:`ShmKeyspaceError`,
so a caller can tell "the mirror is unusable" from a bug in its own code.
"""

from __future__ import annotations


class ShmKeyspaceError(Exception):
    """Base class of every error raised by shmkeyspace."""


class InvalidNameError(ShmKeyspaceError, ValueError):
    """A snapshot name is not usable as a POSIX shared-memory name."""


class SegmentNotFoundError(ShmKeyspaceError, FileNotFoundError):
    """No writer has ever published a snapshot under this name on this host."""


class CorruptSegmentError(ShmKeyspaceError):
    """Shared memory holds something that is not a valid snapshot.

    Raised for wrong magic or layout version, out-of-bounds offsets, truncated
    segments and undecodable entries: a reader never answers from such memory.
    """


class SnapshotExpiredError(ShmKeyspaceError):
    """A :meth:`Reader.snapshot` view outlived the buffer it was reading.

    The writer recycles a buffer two publications after it was published; a view
    held across that is no longer consistent. Keep views short, or take
    ``snapshot(copy=True)`` for a private copy.
    """


class WriterExistsError(ShmKeyspaceError):
    """Another live writer already publishes this snapshot name on this host."""


class WriterLostError(ShmKeyspaceError):
    """This writer's control segment or lock file was removed or replaced while it ran.

    The writer stops publishing (another writer may serve the name now) and retires
    its control segment, so readers re-open the name; restart it to publish again.
    """


class NotSerializableError(ShmKeyspaceError, TypeError):
    """A decoder returned a value that msgpack cannot serialize."""


class SegmentFullError(ShmKeyspaceError, OSError):
    """Shared memory (e.g. /dev/shm) has no room for the next snapshot.

    The writer keeps the last published snapshot and retries on the next change.
    """


class StateFileError(ShmKeyspaceError, ValueError):
    """A state file (``--state-dir``) is unusable; the message says why.

    The writer logs it, ignores the file and loads from etcd instead.
    """


class UntrustedSegmentError(ShmKeyspaceError, PermissionError):
    """A segment (or another file shmkeyspace uses) is controlled by someone it must not trust.

    Raised, naming the file, its owner and mode and what to do, when a writer
    finds a pre-existing control segment it does not own or that others may
    write, and when a reader finds a control segment not owned by root, its own
    uid or the writer uid it was told to trust, a segment writable by anyone
    but its owner, or a data segment whose owner differs from the control
    segment's (``shmkeyspace.trust`` holds the rules).
    """


class InvalidSettingError(ShmKeyspaceError, ValueError):
    """A setting (argument or ``SHMKEYSPACE_*`` variable) has a value that cannot be used."""


class ChangesTooOldError(ShmKeyspaceError):
    """The change feed no longer reaches back to the revision asked about.

    Raised by :meth:`Reader.changes` and :meth:`Reader.watch` when the writer's
    bounded log has dropped the publications after ``since``, or a load/reload
    (whose change set is "everything") lies in between. Recover by reading the
    current snapshot and continuing from its revision (``revision``).
    """

    def __init__(self, message: str, *, since: int = 0, floor: int = 0, revision: int = 0) -> None:
        super().__init__(message)
        #: The revision asked about, the oldest one the feed can answer from, and
        #: the published revision when this was raised.
        self.since = since
        self.floor = floor
        self.revision = revision


class ImageTooLargeError(ShmKeyspaceError, ValueError):
    """A snapshot image would exceed the image size limit (the format's 4 GiB, or lower).

    The writer logs it, keeps the last published snapshot and retries on the
    next change (fewer keys or smaller values may fit again).
    """


class ReaderClosedError(ShmKeyspaceError, ValueError):
    """A closed :class:`Reader`, or a view taken from one, was used.

    A ValueError as well, like I/O on a closed file.
    """


class KeySpaceError(ShmKeyspaceError):
    """An unrecoverable inconsistency between a KeySpace and etcd (a foreign
    cluster, a revision going backwards, a watch error)."""


class LoadFailedError(ShmKeyspaceError):
    """A full load gave up on one Range page after its bounded tries (load.PAGE_TRIES).

    ``cause`` is the last error of that page; ``keys`` how many keys the load had
    read before it. The caller (the writer) starts the load again after a backoff.
    """

    def __init__(self, message: str, cause: BaseException, keys: int) -> None:
        super().__init__(message)
        self.cause = cause
        self.keys = keys


class InvalidPrefixError(ShmKeyspaceError, ValueError):
    """A key prefix (a KeySpace root, the writer's ``--prefix``) is not usable."""


class InvalidKeyError(ShmKeyspaceError, TypeError):
    """A key is neither ``str`` nor bytes-like."""


class DuplicateKeyError(ShmKeyspaceError, ValueError):
    """A set of key/values given as a whole holds the same key twice."""


class FileMissingError(ShmKeyspaceError, FileNotFoundError):
    """A file shmkeyspace was told to use (a TLS file, the etcd binary) does not exist."""


class ClientMissingError(ShmKeyspaceError, ImportError):
    """No usable etcd client library is installed (the ``writer`` extra)."""


class ExtraMissingError(ShmKeyspaceError, ImportError):
    """An optional extra a feature needs is not installed (e.g. ``typed``: msgspec)."""


class ValueTypeError(ShmKeyspaceError, ValueError):
    """A published value does not fit the type a typed view asks for (``Reader.typed``)."""


class TransformError(ShmKeyspaceError, ValueError):
    """The writer's transform (projection) raised for a value: that key is left out."""


class SyncError(ShmKeyspaceError):
    """``Reader.sync()`` could not make the snapshot current: the message says why
    (no writer answering, etcd unreachable from the writer, publications failing)."""


class SyncTimeoutError(SyncError, TimeoutError):
    """``Reader.sync()`` got no answer within its timeout."""


class EtcdConnectError(ShmKeyspaceError, ConnectionError):
    """etcd does not answer at the given endpoints."""


class EtcdServerError(ShmKeyspaceError, RuntimeError):
    """An embedded etcd (the demo's, the tests') failed to start or become healthy."""


class SegmentPermissionError(ShmKeyspaceError, PermissionError):
    """This process may not open a segment (owner, group and mode decide)."""


class WriterStartError(ShmKeyspaceError, RuntimeError):
    """A supervised writer (the gunicorn hooks') exited or published nothing in time."""


class EtcdContactLostError(ShmKeyspaceError, ConnectionError):
    """The writer heard nothing from etcd for its ``stale_after``.

    Raised inside the watch loop (never to readers): the stream is abandoned and
    the writer reconnects, trying the next endpoint it was given.
    """


class WatchSilentError(EtcdContactLostError):
    """The watch stream delivered nothing, not even progress notifications, for the
    writer's ``watch_silence``, while etcd answered reads (a dead stream behind a gRPC
    proxy: etcd issue 21813). Raised inside the watch loop: the stream is abandoned and
    opened again (on the next endpoint), like a lost contact.
    """


class WatchCanceledError(ShmKeyspaceError):
    """etcd canceled or ended the watch stream (``reason`` says why, when it did)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WatchCompactedError(WatchCanceledError):
    """The watch asked for revisions etcd has compacted away; the mirror reloads."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compacted_revision})")
        self.compacted_revision = compacted_revision


def describe(exc: BaseException) -> str:
    """One line for a logged error: a gRPC error (duck-typed, so this module
    imports no grpc) as ``CODE: details``, anything else as ``Type: message``."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]  # grpc.RpcError
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"
