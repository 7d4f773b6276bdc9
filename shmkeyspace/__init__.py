"""shmkeyspace: an etcd prefix mirrored into shared memory for whole process fleets.

Readers import :class:`Reader` (no grpc, no protobuf); the writer side
(:class:`Writer`, :mod:`shmkeyspace.etcd`) needs the ``writer`` extra.
Names are resolved lazily so ``import shmkeyspace`` stays cheap in every worker.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "KeySpace": "keyspace",
    "Header": "keyspace",
    "KeyValue": "key_values",
    "KeyValues": "key_values",
    "Reader": "reader",
    "Entry": "views",
    "Health": "views",
    "SnapshotView": "views",
    "Writer": "writer",
    "ShmKeyspaceError": "errors",
    "CorruptSegmentError": "errors",
    "SegmentNotFoundError": "errors",
    "SnapshotExpiredError": "errors",
    "WriterExistsError": "errors",
    "WriterLostError": "errors",
    "InvalidNameError": "errors",
    "NotSerializableError": "errors",
    "SegmentFullError": "errors",
    "ChangesTooOldError": "errors",
    "Changes": "feed",
    "Derived": "derived",
    "ReaderClosedError": "errors",
    "KeySpaceError": "errors",
    "InvalidPrefixError": "errors",
    "InvalidKeyError": "errors",
    "DuplicateKeyError": "errors",
    "InvalidSettingError": "errors",
    "FileMissingError": "errors",
    "ClientMissingError": "errors",
    "ExtraMissingError": "errors",
    "ValueTypeError": "errors",
    "EtcdConnectError": "errors",
    "EtcdServerError": "errors",
    "SegmentPermissionError": "errors",
    "WriterStartError": "errors",
    "StateFileError": "errors",
    "UntrustedSegmentError": "errors",
    "ImageTooLargeError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'shmkeyspace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
