"""The compiled apply path (apply.py) against the Python loop of KeySpace.apply, its reference.

Random event streams (puts, deletes, re-creates, deletes of missing keys, stale
mod_revisions, keys outside root, values that fail to decode or to pack) go through
both paths as the client delivers them (pyetcd's events around real protobuf
messages); after every batch the two must hold byte-identical images, report the
same changed keys, revision and exclusions, and have logged the same records.
Then the same through real Writers against the real etcd of the fixtures, with a
compaction reload in the middle.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any, Callable, List, Optional, Tuple

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmkeyspace import apply, decoders
from shmkeyspace.etcd import WatchResponse
from shmkeyspace.keyspace import KeySpace
from shmkeyspace.snapshot import MAX_IMAGE, pack_entry
from shmkeyspace.store import PackedLoader

if "c" not in apply.IMPLEMENTATIONS:
    pytest.skip("the compiled apply path is not built", allow_module_level=True)

pb = pytest.importorskip("pyetcd.etcdrpc.kv_pb2")
rpc = pytest.importorskip("pyetcd.etcdrpc")
from pyetcd.events import new_event  # noqa: E402

ROOT = "/r"
KINDS = ["raw", "utf8", "json", "msgpack"]


def _keyspace(kind: str, compiled: bool) -> Tuple[KeySpace, List[Any]]:
    """A KeySpace as a Writer builds it (decode + pack_entry, a PackedStore), and its updates."""
    user = decoders.BUILTIN[kind]
    verify = not getattr(user, "msgpack_safe", False)

    def decode(kv: Any) -> bytes:
        return pack_entry(kv.key, user(kv), kv.create_revision, kv.mod_revision, kv.version, kv.lease, verify)

    applier = apply.CompiledApply(kind) if compiled else None
    ks = KeySpace(ROOT, decode, store=lambda: PackedLoader(MAX_IMAGE, applier))
    updates: List[Any] = []

    def observe() -> None:  # what UpdatePublisher does with each update, minus shared memory
        store = ks.key_values
        changed = ks.changed_keys
        if changed is not None:
            store.builder.apply_entries(store.take(), ks.header.revision)
        updates.append((ks.header.revision, None if changed is None else sorted(changed)))

    ks.observers.append(observe)
    return ks, updates


def _image(ks: KeySpace) -> bytes:
    b = ks.key_values.builder
    b._check()
    parts, total = b.parts()
    out = b"".join(bytes(p) for p in parts)
    assert len(out) == total
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[Tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _capture(fn: Callable[[], Any]) -> Tuple[Any, List[Tuple[str, int, str]], Optional[str]]:
    h = _Records()
    lg = logging.getLogger("shmkeyspace")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    try:
        try:
            return fn(), h.records, None
        except Exception as exc:  # both paths must raise alike too
            return None, h.records, f"{type(exc).__name__}: {exc}"
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


# -- random streams ----------------------------------------------------------------------

KEYS = [b"/r/a", b"/r/b", b"/r/c/d", b"/r/\xff\xfe", b"/r/" + b"k" * 40, b"/r/\xc3\xa9", b"/rx", b"/q/out"]


def _value(rnd: random.Random, kind: str) -> bytes:
    good = rnd.random() < 0.75
    if kind == "raw":
        return rnd.randbytes(rnd.randrange(0, 300))
    if kind == "utf8":
        if good:
            return "".join(rnd.choice("aé€\U0001f600z") for _ in range(rnd.randrange(0, 40))).encode()
        return rnd.choice([b"\xff", b"a\xc3", b"\xed\xa0\x80", b"ok\x80"])
    if kind == "json":
        if good:
            v: Any = {
                "host": f"10.0.0.{rnd.randrange(256)}",
                "port": rnd.randrange(-(2**63), 2**64)
                if rnd.random() < 0.2
                else rnd.randrange(-(2**40), 2**40),
                "w": rnd.random() * 10 ** rnd.randrange(-5, 300) if rnd.random() < 0.2 else rnd.random(),
                "tags": [
                    rnd.choice([None, True, False, "x" * rnd.randrange(40)]) for _ in range(rnd.randrange(20))
                ],
                "n": {"k" * rnd.randrange(1, 300): [[]] * rnd.randrange(3)},
            }
            return json.dumps(v).encode()
        return rnd.choice(
            [
                b"{",
                b"not json",
                b'{"a": NaN}',  # json.loads takes it, orjson does not: the standard parser decides
                b'"\\ud800"',  # a lone surrogate: parses, cannot be packed
                b"123456789012345678901234567890",  # beyond 64 bits: parses, cannot be packed
                b'{"a": 1, "a": 2, "b": 3}',
                b"[" * 600 + b"]" * 600,  # deeper than the packer's limit
                b"\xff",
                b"1e400",
                b'{"big": 18446744073709551615, "neg": -9223372036854775808}',
            ]
        )
    if good:
        return msgpack.packb(
            {
                "a": rnd.randrange(-(2**63), 2**64),
                "b": rnd.randbytes(rnd.randrange(300)),
                "c": [1.5, None, "s"],
            }
        )
    return rnd.choice(
        [
            b"\xc1",
            msgpack.packb({1: 2}),  # int keys: refused by the unpacker (strict_map_key)
            msgpack.packb({b"k": 1}),  # bytes keys: unpacked, but readers cannot take them
            msgpack.packb(msgpack.ExtType(5, b"x")),
            b"\x92\x01",
            msgpack.packb([[[[1]]]]) + b"\x00",  # extra data
            msgpack.packb(2**64 - 1),
        ]
    )


def _stream(
    rnd: random.Random, kind: str, batches: int, keys: List[bytes] = KEYS, per_txn: int = 8
) -> List[List[Any]]:
    """Batches of watch responses, each response one transaction (one revision)."""
    rev = 1
    out = []
    for _ in range(batches):
        batch = []
        for _ in range(rnd.randrange(1, 4)):
            rev += 1
            events = []
            for _ in range(rnd.randrange(0, per_txn)):
                key = rnd.choice(keys)
                mod = rev if rnd.random() < 0.9 else rnd.randrange(1, rev + 1)  # stale now and then
                if rnd.random() < 0.3:
                    ev = pb.Event(type=pb.Event.DELETE, kv=pb.KeyValue(key=key, mod_revision=mod))
                else:
                    ev = pb.Event(
                        type=pb.Event.PUT,
                        kv=pb.KeyValue(
                            key=key,
                            value=_value(rnd, kind),
                            create_revision=rnd.randrange(1, mod + 1),
                            mod_revision=mod,
                            version=rnd.randrange(1, 2**40),
                            lease=rnd.choice([0, 0, 1, 2**62, 2**63 - 1]),
                        ),
                    )
                events.append(new_event(ev))
            hdr = rpc.ResponseHeader(cluster_id=7, member_id=1, revision=rev, raft_term=1)
            batch.append(WatchResponse(hdr, events))
        out.append(batch)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_both_paths_agree_on_random_streams(kind: str, seed: int) -> None:
    rnd = random.Random(f"{kind}-{seed}")
    py, py_updates = _keyspace(kind, compiled=False)
    c, c_updates = _keyspace(kind, compiled=True)
    assert py.key_values.apply_events is None and c.key_values.apply_events is not None
    for batch in _stream(rnd, kind, 40):
        r1, log1, err1 = _capture(lambda: py.apply(*batch))
        r2, log2, err2 = _capture(lambda: c.apply(*batch))
        assert (err1, log1) == (err2, log2)
        assert py_updates == c_updates
        assert py.header == c.header
        assert py.excluded_count == c.excluded_count
        assert len(py.key_values) == len(c.key_values)
        assert _image(py) == _image(c)


@pytest.mark.parametrize("kind", ["raw", "json"])
@pytest.mark.parametrize("seed", range(3))
def test_both_paths_agree_with_many_keys(kind: str, seed: int) -> None:
    """Longer runs of updates in a bigger table (update_entries), with inserts and deletes between."""
    rnd = random.Random(f"many-{kind}-{seed}")
    keys = [b"/r/m/%05d" % i for i in range(600)] + KEYS
    py, py_updates = _keyspace(kind, compiled=False)
    c, c_updates = _keyspace(kind, compiled=True)
    for batch in _stream(rnd, kind, 25, keys, per_txn=200):
        r1, log1, err1 = _capture(lambda: py.apply(*batch))
        r2, log2, err2 = _capture(lambda: c.apply(*batch))
        assert (err1, log1) == (err2, log2)
        assert py.header == c.header and py.excluded_count == c.excluded_count
        assert _image(py) == _image(c)
    assert py_updates == c_updates and len(py.key_values) > 300


@pytest.mark.parametrize("kind", KINDS)
def test_fast_entries_are_pack_entry_bytes(kind: str) -> None:
    """Where the C packer takes a value itself, its entry is pack_entry's, byte for byte."""
    rnd = random.Random(kind)
    a = apply.CompiledApply(kind)
    user = decoders.BUILTIN[kind]
    verify = not getattr(user, "msgpack_safe", False)
    taken = 0
    for _ in range(600):
        key, value = rnd.choice(KEYS), _value(rnd, kind)
        ints = (
            rnd.randrange(2**63),
            rnd.randrange(2**63),
            rnd.randrange(2**63),
            rnd.randrange(-(2**63), 2**63),
        )
        got = a.pack(key, value, *ints)
        try:
            from shmkeyspace.key_values import KeyValue

            want: Optional[bytes] = pack_entry(key, user(KeyValue(key, value, *ints, None)), *ints, verify)
        except Exception:
            want = None
        if got is not None:
            taken += 1
            assert got == want, (key, value)
    assert taken > 200


_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    _leaves,
    lambda c: st.lists(c, max_size=20) | st.dictionaries(st.text(max_size=5), c, max_size=20),
    max_leaves=40,
)
_revs = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=4, max_size=4)


def _reference(kind: str, key: bytes, value: bytes, revs: List[int]) -> Optional[bytes]:
    from shmkeyspace.key_values import KeyValue

    user = decoders.BUILTIN[kind]
    try:
        return pack_entry(key, user(KeyValue(key, value, *revs, None)), *revs, kind == "msgpack")
    except Exception:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.binary(max_size=70), value=values, revs=_revs)
def test_msgpack_values_pack_as_pack_entry_does(key: bytes, value: Any, revs: List[int]) -> None:
    try:
        raw = msgpack.packb(value, use_bin_type=True)
    except OverflowError:  # an int beyond 64 bits: no msgpack value holds it
        return
    got = apply.CompiledApply("msgpack").pack(key, raw, *revs)
    if got is not None:
        assert got == _reference("msgpack", key, raw, revs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.binary(max_size=70), value=values, revs=_revs)
def test_json_values_pack_as_pack_entry_does(key: bytes, value: Any, revs: List[int]) -> None:
    try:
        raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except TypeError:  # bytes in the value: not JSON
        return
    got = apply.CompiledApply("json").pack(key, raw, *revs)
    if got is not None:
        assert got == _reference("json", key, raw, revs)


# -- real Writers, real etcd ---------------------------------------------------------------


def test_writers_on_both_paths_publish_the_same_entries(own_etcd, prefix, shm_name, tmp_path) -> None:
    """Live churn, a restart that catches up from the state file, and one compacted past it."""
    from shmkeyspace import Reader
    from shmkeyspace.etcd import connect
    from shmkeyspace.writer import Writer

    client = connect(own_etcd.endpoint)
    rnd = random.Random(5)
    keys = [f"{prefix}/k{i:03d}" for i in range(150)]
    for k in keys[:100]:
        client.put(k, json.dumps({"v": k}))

    def start() -> dict:
        ws = {
            impl: Writer(
                f"{shm_name}-{impl}",
                prefix,
                client=client,
                decoder=decoders.json,
                apply_impl=impl,
                apply_delay=0.005,
                state_dir=str(tmp_path / impl),
                unlink_on_exit=True,
            )
            for impl in ("python", "c")
        }
        for w in ws.values():
            w.start()
        return ws

    def churn(n: int) -> int:
        for _ in range(n):
            k = rnd.choice(keys)
            r = rnd.random()
            if r < 0.2:
                client.delete(k)
            elif r < 0.3:
                client.put(k, b"{broken")
            else:
                client.put(k, json.dumps({"v": rnd.random(), "n": rnd.randrange(2**40)}))
        return int(client.get_response(keys[0]).header.revision)

    def same(ws: dict, rev: int) -> None:
        for impl, w in ws.items():
            assert w.keyspace.wait_for_revision(rev, 30), impl
        assert len({w.revision for w in ws.values()}) == 1
        entries = []
        for impl in ws:
            with Reader(f"{shm_name}-{impl}") as r, r.snapshot(copy=True) as s:
                entries.append([tuple(e) for e in s.range(prefix, None)])
        assert entries[0] == entries[1] and len(entries[0]) > 50
        assert len({w.publishing.excluded_count for w in ws.values()}) == 1

    writers = start()
    try:
        assert {impl: w.apply_impl for impl, w in writers.items()} == {"python": "python", "c": "c"}
        same(writers, churn(300))
        for w in writers.values():
            w.stop()
        rev = churn(100)
        writers = start()  # from the state file: the watch catches up
        assert {w.restored is not None for w in writers.values()} == {True}
        assert writers["c"].keyspace.key_values.apply_events is not None
        same(writers, rev)
        same(writers, churn(100))
        for w in writers.values():
            w.stop()
        rev = churn(50)
        client.compact(rev)
        writers = start()  # compacted past the file: a full load, then the watch
        assert writers["c"].keyspace.key_values.apply_events is not None
        same(writers, churn(100))
    finally:
        for w in writers.values():
            w.stop()
        client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_loads_on_both_paths_build_the_same_image(kind: str, etcd_server, client, prefix) -> None:
    """A load's pages through the compiled decode + pack (PackedLoader.add_page) and through
    the Python loop: byte-identical images, the same keys left out, the same log records."""
    rnd = random.Random(f"load-{kind}")
    for i in range(400):
        client.put(f"{prefix}/k{i:04d}/{rnd.randrange(1000)}", _value(rnd, kind))
    out = {}
    for compiled in (False, True):
        user = decoders.BUILTIN[kind]
        verify = not getattr(user, "msgpack_safe", False)

        def decode(kv: Any, user: Any = user, verify: bool = verify) -> bytes:
            return pack_entry(
                kv.key, user(kv), kv.create_revision, kv.mod_revision, kv.version, kv.lease, verify
            )

        applier = apply.CompiledApply(kind) if compiled else None
        ks = KeySpace(prefix, decode, store=lambda a=applier: PackedLoader(MAX_IMAGE, a))
        rev = int(client.get_response(b"\0").header.revision)
        _, records, err = _capture(lambda ks=ks, rev=rev: ks.load(client, rev=rev, page_size=64))
        assert err is None, err
        assert len(ks.key_values) > 0
        out[compiled] = (_image(ks), ks.excluded_count, records)
    assert out[True][0] == out[False][0]
    assert out[True][1:] == out[False][1:]
    if kind != "raw":
        assert out[True][1] > 0  # the random values include rejected ones
