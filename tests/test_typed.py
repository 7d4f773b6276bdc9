"""Typed values: ``decoders.struct`` in a real Writer, ``Reader.typed`` in readers.

A msgspec Struct validates values in the writer (a value that does not fit is a
decode failure: logged, the key left out until a valid value arrives) and
readers get Entries whose ``decoded`` is an instance of the Struct, on both
read paths, from the library and from ``shmkeyspace writer --decoder struct:...``.
The typed answers equal ``msgspec.convert`` of the untyped ones on random data.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import textwrap
import time
from typing import Any, List, Optional

import conftest
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import WriterProc

from shmkeyspace import Reader, ValueTypeError, Writer, decoders
from shmkeyspace.errors import InvalidSettingError
from shmkeyspace.reader import IMPLEMENTATIONS


class Service(msgspec.Struct):
    host: str
    port: int
    weight: float = 1.0
    tags: List[str] = []
    zone: Optional[str] = None


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _svc(n):
    return Service(
        host=f"10.0.0.{n}", port=8000 + n, weight=n / 4, tags=[f"t{n}"], zone=None if n % 2 else "a"
    )


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_struct_values_round_trip_and_invalid_ones_are_left_out(
    etcd_server, client, prefix, shm_name, fmt, caplog
):
    enc = msgspec.json.encode if fmt == "json" else msgspec.msgpack.encode
    for n in range(5):
        client.put(f"{prefix}/svc/{n}", enc(_svc(n)))
    client.put(f"{prefix}/svc/bad", enc({"host": "h", "port": "not an int"}))
    dec = decoders.struct(Service, format=fmt)
    caplog.set_level(logging.WARNING)
    with Writer(shm_name, prefix, endpoints=etcd_server.endpoint, decoder=dec, apply_delay=0.002) as w:
        w.start()
        assert w.decoder_name == f"struct:{__name__}:Service" + (":msgpack" if fmt == "msgpack" else "")
        assert "svc/bad" in caplog.text
        for impl in IMPLEMENTATIONS:
            with Reader(shm_name, implementation=impl) as r:
                t = r.typed(Service)
                assert r.typed(Service) is t
                for n in range(5):
                    e = t.get(f"{prefix}/svc/{n}")
                    assert type(e.decoded) is Service and e.decoded == _svc(n), impl
                    assert e[2:] == r.get(f"{prefix}/svc/{n}")[2:]
                    assert t[f"{prefix}/svc/{n}"] == e
                assert t.get(f"{prefix}/svc/bad") is None and r.get(f"{prefix}/svc/bad") is None
                assert t.get(f"{prefix}/none") is None
                with pytest.raises(KeyError):
                    t[f"{prefix}/none"]
                got = t.prefixed(f"{prefix}/svc/")
                assert [e.decoded for e in got] == [_svc(n) for n in range(5)]
                assert [e.key for e in got] == [e.key for e in r.prefixed(f"{prefix}/svc/")]
                assert [e.decoded for e in t.range(f"{prefix}/svc/1", f"{prefix}/svc/3")] == [
                    _svc(1),
                    _svc(2),
                ]
                assert t.range(f"{prefix}/svc/3", f"{prefix}/svc/1") == []
                # Untyped readers get the builtin form.
                assert r.get(f"{prefix}/svc/1").decoded == msgspec.to_builtins(_svc(1))

        # An invalid value removes the key; a later valid one brings it back.
        caplog.clear()
        rev = client.put(f"{prefix}/svc/1", enc({"host": 5})).header.revision
        _wait(lambda: w.revision >= rev)
        with Reader(shm_name) as r:
            _wait(lambda: r.revision >= rev)
            assert r.typed(Service).get(f"{prefix}/svc/1") is None
        assert "svc/1" in caplog.text
        rev = client.put(f"{prefix}/svc/1", enc(_svc(11))).header.revision
        with Reader(shm_name) as r:
            _wait(lambda: r.revision >= rev)
            for impl in IMPLEMENTATIONS:
                with Reader(shm_name, implementation=impl) as r2:
                    assert r2.typed(Service).get(f"{prefix}/svc/1").decoded == _svc(11)


def test_a_value_of_another_type_raises_value_type_error(etcd_server, client, prefix, shm_name):
    client.put(f"{prefix}/k", json.dumps({"host": "h"}))  # no port: not a Service
    with Writer(shm_name, prefix, endpoints=etcd_server.endpoint, decoder=decoders.json) as w:
        w.start()
        for impl in IMPLEMENTATIONS:
            with Reader(shm_name, implementation=impl) as r:
                with pytest.raises(ValueTypeError, match="does not decode as"):
                    r.typed(Service).get(f"{prefix}/k")
                with pytest.raises(ValueTypeError):
                    r.typed(Service).prefixed(prefix)
                assert r.typed(dict).get(f"{prefix}/k").decoded == {"host": "h"}
                with pytest.raises(TypeError):
                    r.typed(Service).get(42)


class Deep(msgspec.Struct):
    x: Any


def test_values_the_compiled_decoder_leaves_to_the_whole_entry_decoder(etcd_server, client, prefix, shm_name):
    deep: Any = 1
    for _ in range(250):  # deeper than the C decoder's MAX_DEPTH: the whole entry goes to msgspec
        deep = [deep]
    client.put(f"{prefix}/deep", msgspec.json.encode(Deep(deep)))
    client.put(f"{prefix}/flat", msgspec.json.encode(Deep([1, "a", None])))
    with Writer(shm_name, prefix, endpoints=etcd_server.endpoint, decoder=decoders.struct(Deep)) as w:
        w.start()
        for impl in IMPLEMENTATIONS:
            with Reader(shm_name, implementation=impl) as r:
                assert r.typed(Deep).get(f"{prefix}/deep").decoded == Deep(deep)
                assert r.typed(Deep).get(f"{prefix}/flat".encode()) == r.typed(Deep).get(f"{prefix}/flat")
                assert r.typed(Deep).get(f"{prefix}/flat").key == f"{prefix}/flat"


def test_bad_settings_are_one_clear_error():
    with pytest.raises(InvalidSettingError, match="format"):
        decoders.struct(Service, format="yaml")
    with pytest.raises(InvalidSettingError, match="cannot decode into"):
        decoders.struct(object())
    with pytest.raises(InvalidSettingError, match="no type"):
        decoders.resolve(f"struct:{__name__}:Nope")
    with pytest.raises(InvalidSettingError, match="cannot import"):
        decoders.resolve("struct:no_such_module_x:Service")
    with pytest.raises(InvalidSettingError, match="struct:MODULE:TYPE"):
        decoders.resolve("struct:onlymodule")
    d = decoders.resolve(f"struct:{__name__}:Service:msgpack")
    assert d.struct_type is Service


def test_cli_struct_decoder(etcd_server, client, prefix, shm_name, python_env, tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import msgspec\n\nclass Svc(msgspec.Struct):\n    host: str\n    port: int\n"
    )
    env = dict(python_env, PYTHONPATH=f"{tmp_path}{os.pathsep}{python_env['PYTHONPATH']}")
    client.put(f"{prefix}/a", json.dumps({"host": "h1", "port": 1}))
    rev = client.put(f"{prefix}/bad", json.dumps({"host": "h2"})).header.revision
    w = WriterProc(env, tmp_path, etcd_server.endpoint, prefix, shm_name, "--decoder", "struct:my_models:Svc")
    try:
        w.wait_published(rev)
        code = textwrap.dedent(f"""
            import json, my_models
            from shmkeyspace import Reader
            with Reader({shm_name!r}) as r:
                t = r.typed(my_models.Svc)
                e = t.get({prefix + "/a"!r})
                assert type(e.decoded) is my_models.Svc, e
                print(json.dumps([e.decoded.host, e.decoded.port, len(t.prefixed({prefix!r}))]))
        """)
        p = subprocess.run([conftest.PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout) == ["h1", 1, 1]
        assert "/bad" in w.output()
    finally:
        w.stop(signal.SIGKILL)


def test_readers_that_ask_for_no_types_never_import_msgspec(python_env):
    code = textwrap.dedent("""
        import sys
        import shmkeyspace
        from shmkeyspace import Reader, decoders, reader
        decoders.resolve("json")
        assert "msgspec" not in sys.modules, "msgspec imported"
        sys.modules["msgspec"] = None  # as if not installed
        from shmkeyspace import ExtraMissingError
        try:
            decoders.struct(dict)
        except ExtraMissingError as exc:
            assert "shmkeyspace[typed]" in str(exc)
        else:
            raise AssertionError("no ExtraMissingError")
        try:
            reader.TypedView(None, dict)
        except ExtraMissingError:
            print("ok")
    """)
    p = subprocess.run(
        [conftest.PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "ok"


# -- differential: typed answers == msgspec.convert of the untyped ones ---------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_service = st.builds(
    Service,
    host=_text,
    port=st.integers(-(2**63), 2**64 - 1),
    weight=st.floats(allow_nan=False, allow_infinity=False),  # JSON has no inf
    tags=st.lists(_text, max_size=4),
    zone=st.none() | _text,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=st.dictionaries(st.text("abcxyz/é", min_size=1, max_size=6), _service, max_size=40),
    probes=st.lists(st.text("abcxyz/é", max_size=6), max_size=10),
)
def test_typed_equals_convert_of_untyped(etcd_server, client, prefix, shm_name, data, probes):
    p = f"{prefix}/{time.monotonic_ns()}/"
    rev = 0
    for k, v in data.items():
        rev = client.put(p + k, msgspec.json.encode(v)).header.revision
    name = f"{shm_name}-{time.monotonic_ns() % 10**9}"

    def conv(es):
        return [e._replace(decoded=msgspec.convert(e.decoded, Service)) for e in es]

    def check(r):
        t = r.typed(Service)
        assert t.prefixed(p) == conv(r.prefixed(p)) and len(t.prefixed(p)) == len(data)
        assert [e.decoded for e in t.prefixed(p)] == [data[k] for k in sorted(data, key=str.encode)]
        for k in list(data)[:10] + probes:
            u = r.get(p + k)
            assert r.typed(Service).get((p + k).encode()) == t.get(p + k)  # bytes keys too
            assert t.get(p + k) == (None if u is None else conv([u])[0])
        for a, b in zip(probes, probes[1:]):
            assert t.range(p + a, p + b) == conv(r.range(p + a, p + b))
        first = p + (probes[0] if probes else "")
        assert t.range(first, None) == conv(r.range(first, None))

    try:
        with Writer(name, p, endpoints=etcd_server.endpoint, decoder=decoders.struct(Service)) as w:
            w.start()
            assert w.revision >= rev
            for impl in IMPLEMENTATIONS:
                with Reader(name, implementation=impl) as r:
                    check(r)
            # Updated entries are appended to the arena: ranges are no longer back to back.
            for k in list(data)[::3]:
                data[k] = msgspec.structs.replace(data[k], port=data[k].port // 2, tags=["u"])
                rev = client.put(p + k, msgspec.json.encode(data[k])).header.revision
            for impl in IMPLEMENTATIONS:
                with Reader(name, implementation=impl) as r:
                    assert r.wait_for_revision(rev, timeout=30)  # published, not only applied
                    check(r)
    finally:
        from shmkeyspace import writerlock

        writerlock.unlink_all(name)
