"""The public surface: what ``import shmkeyspace`` costs a reader, and the error types.

Proves that importing the package and resolving every public name a reader uses
(Reader, SnapshotView, every exception) loads no grpc, protobuf or etcd client,
and that every exception class the package exports, or defines in
``shmkeyspace.errors``, is a :class:`ShmKeyspaceError` (so ``except
ShmKeyspaceError`` catches every failure the package raises on purpose), with
the standard bases that callers already catch kept where they apply.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import textwrap

import conftest
import pytest

import shmkeyspace
from shmkeyspace import errors


def _exported_exceptions():
    out = {}
    for name in shmkeyspace.__all__:
        obj = getattr(shmkeyspace, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            out[name] = obj
    for name, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__:
            out[name] = obj
    return out


def test_every_public_exception_is_a_shmkeyspace_error():
    found = _exported_exceptions()
    assert len(found) >= 15, sorted(found)
    bad = sorted(n for n, cls in found.items() if not issubclass(cls, shmkeyspace.ShmKeyspaceError))
    assert bad == [], f"not ShmKeyspaceError subclasses: {bad}"


@pytest.mark.parametrize(
    "name, base",
    [
        ("InvalidNameError", ValueError),
        ("InvalidPrefixError", ValueError),
        ("InvalidKeyError", TypeError),
        ("DuplicateKeyError", ValueError),
        ("InvalidSettingError", ValueError),
        ("StateFileError", ValueError),
        ("UntrustedSegmentError", PermissionError),
        ("SegmentNotFoundError", FileNotFoundError),
        ("FileMissingError", FileNotFoundError),
        ("SegmentPermissionError", PermissionError),
        ("SegmentFullError", OSError),
        ("EtcdConnectError", ConnectionError),
        ("ClientMissingError", ImportError),
    ],
)
def test_standard_bases_are_kept(name, base):
    assert issubclass(getattr(shmkeyspace, name), base)


def test_private_helpers_raise_shmkeyspace_errors_too():
    from shmkeyspace.children import ChildError
    from shmkeyspace.cli import CliError
    from shmkeyspace.demo import DemoError

    for cls in (ChildError, CliError, DemoError):
        assert issubclass(cls, shmkeyspace.ShmKeyspaceError), cls


def test_keyspace_and_key_values_raise_the_typed_errors():
    from shmkeyspace import KeySpace, KeyValues
    from shmkeyspace.key_values import KeyValue

    with pytest.raises(shmkeyspace.InvalidPrefixError, match="not clean"):
        KeySpace("/a//b")
    with pytest.raises(shmkeyspace.InvalidKeyError):
        KeyValues().get(42)
    kv = KeyValue(b"/k", b"v", 1, 1, 1, 0, None)
    with pytest.raises(shmkeyspace.DuplicateKeyError):
        KeyValues([kv, kv])


def test_reader_side_import_pulls_no_grpc_or_protobuf(python_env):
    code = textwrap.dedent("""
        import inspect, json, sys
        import shmkeyspace
        for name in shmkeyspace.__all__:
            if name in ("Writer", "KeySpace", "Header"):
                continue  # the writer side: allowed to need the writer extra
            getattr(shmkeyspace, name)
        from shmkeyspace import Reader, SnapshotView
        import shmkeyspace.reader
        assert SnapshotView is shmkeyspace.reader.SnapshotView and SnapshotView.__module__ == "shmkeyspace.views"
        print(json.dumps(sorted(m for m in sys.modules
                                if m.split(".")[0] in ("grpc", "google", "pyetcd", "etcd3")
                                or m in ("shmkeyspace.etcd", "shmkeyspace.embedded", "shmkeyspace.children"))))
    """)
    p = subprocess.run(
        [conftest.PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout) == []
