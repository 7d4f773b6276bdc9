"""etcd glue: endpoint parsing and connection errors, the etcd3 client, and a reader
import that stays free of grpc/protobuf.

The etcd3 (python-etcd3 0.12) checks run in child processes: that client only
imports under protobuf's pure-Python backend, which must be chosen before
protobuf is first imported, and this test process already holds the upb one.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import conftest
import pytest

from shmkeyspace.embedded import free_port
from shmkeyspace.etcd import connect, parse_endpoints


@pytest.mark.parametrize(
    "endpoints, fragment",
    [
        ("localhost", "'localhost'"),
        ("127.0.0.1:abc", "'127.0.0.1:abc'"),
        ("127.0.0.1:0", "'127.0.0.1:0'"),
        ("127.0.0.1:70000", "'127.0.0.1:70000'"),
        (":2379", "':2379'"),
        ("127.0.0.1:2379,nohost", "'nohost'"),
        ("", "no etcd endpoint"),
        (" , ", "no etcd endpoint"),
        ([], "no etcd endpoint"),
    ],
)
def test_bad_endpoints_raise_valueerror_naming_them(endpoints, fragment):
    with pytest.raises(ValueError) as ei:
        connect(endpoints, timeout=1)
    assert fragment in str(ei.value)
    if fragment.startswith("'"):
        assert "HOST:PORT" in str(ei.value)


def test_good_endpoint_forms():
    assert parse_endpoints("http://10.0.0.1:2379/, https://h:1") == [("10.0.0.1", 2379), ("h", 1)]
    assert parse_endpoints(["[::1]:2379"]) == [("::1", 2379)]


def test_unknown_client_and_tls_arguments():
    with pytest.raises(ValueError, match="unknown etcd client 'nope'"):
        connect("127.0.0.1:2379", client="nope")
    with pytest.raises(FileNotFoundError, match="/nonexistent/ca.pem"):
        connect("127.0.0.1:2379", ca_cert="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="both"):
        connect("127.0.0.1:2379", cert_cert=__file__)


def test_unreachable_endpoint_raises_connectionerror_naming_it():
    port = free_port()  # bound then released: nothing listens there
    with pytest.raises(ConnectionError) as ei:
        connect(f"127.0.0.1:{port}", timeout=1)
    assert f"127.0.0.1:{port}" in str(ei.value)


def test_connect_works(etcd_server, prefix):
    c = connect(etcd_server.endpoint)
    try:
        assert type(c).__module__.startswith("pyetcd")  # 'auto' prefers pyetcd
        c.put(prefix + "/x", "1")
        assert c.get(prefix + "/x")[0] == b"1"
    finally:
        c.close()


ETCD3_CHILD = textwrap.dedent("""
    import json, sys
    from shmkeyspace.etcd import connect
    from shmkeyspace.keyspace import KeySpace
    from shmkeyspace import decoders
    ep, root = sys.argv[1], sys.argv[2]
    c = connect(ep, client="etcd3")
    from google.protobuf.internal import api_implementation
    c.put(root + "/a", "1")
    c.put(root + "/b", "2")
    ks = KeySpace(root, decoders.utf8)
    ks.load(c, page_size=1)
    loaded = sorted(kv.key.decode() for kv in ks.key_values)
    wt = ks.start_watch(c)
    r = int(c.put(root + "/c", "3").header.revision)
    ok = ks.wait_for_revision(r, 10)
    d = c.delete(root + "/a", return_response=True)
    ok2 = ks.wait_for_revision(int(d.header.revision), 10)
    with ks.lock:
        final = {kv.key.decode(): kv.decoded for kv in ks.key_values}
        rev = ks.header.revision
    wt.stop()
    print(json.dumps({"client": type(c).__module__, "protobuf": api_implementation.Type(),
                      "loaded": loaded, "ok": ok and ok2, "final": final,
                      "revision": rev, "delete_revision": int(d.header.revision),
                      "alive": wt.is_alive(), "error": repr(wt.error)}))
    c.close()
""")


def test_etcd3_client_load_and_watch(etcd_server, prefix, python_env):
    env = dict(python_env)
    env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)  # connect() must choose it
    p = subprocess.run(
        [conftest.PYTHON, "-c", ETCD3_CHILD, etcd_server.endpoint, prefix + "/e3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["client"].startswith("etcd3")
    assert out["protobuf"] == "python"
    assert out["loaded"] == [prefix + "/e3/a", prefix + "/e3/b"]
    assert out["ok"] is True
    assert out["final"] == {prefix + "/e3/b": "2", prefix + "/e3/c": "3"}
    assert out["revision"] == out["delete_revision"]
    assert out["alive"] is False and out["error"] == "None"


def test_etcd3_after_upb_protobuf_fails_clearly(etcd_server, python_env):
    code = textwrap.dedent("""
        import sys
        import google.protobuf.descriptor_pb2  # the upb backend is now fixed for this process
        from shmkeyspace.etcd import connect
        try:
            connect(sys.argv[1], client="etcd3")
        except ImportError as exc:
            print("IMPORTERROR", exc)
        else:
            print("CONNECTED")
    """)
    env = dict(python_env)
    env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)
    p = subprocess.run(
        [conftest.PYTHON, "-c", code, etcd_server.endpoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("IMPORTERROR"), p.stdout
    assert "etcd3" in p.stdout and "shmkeyspace[writer]" in p.stdout


def test_reader_import_pulls_no_grpc_or_protobuf(python_env):
    code = textwrap.dedent("""
        import json, sys
        import shmkeyspace
        from shmkeyspace import Reader
        assert Reader.__module__ == "shmkeyspace.reader"
        print(json.dumps(sorted(m for m in sys.modules
                                if m.split(".")[0] in ("grpc", "google", "pyetcd", "etcd3")
                                or m in ("shmkeyspace.etcd", "shmkeyspace.embedded"))))
    """)
    p = subprocess.run(
        [conftest.PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout) == []
