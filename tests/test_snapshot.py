"""Snapshot format and Reader queries against a simple reference (KeyValues / sorted dict).

Images are built by ImageBuilder (full reset and incremental apply), published
into real shared memory by a Publisher, and read back by a Reader.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmkeyspace import publisher, segment
from shmkeyspace import reader as reader_mod
from shmkeyspace.builder import ImageBuilder
from shmkeyspace.errors import NotSerializableError
from shmkeyspace.key_values import KeyValue, KeyValues, prefix_end
from shmkeyspace.reader import Reader
from shmkeyspace.snapshot import ImageView, entry_key, pack_entry

# Keys: short, from a small alphabet so prefixes and ranges overlap, with
# 0xff and non-UTF-8 bytes in the mix.
key_bytes = st.binary(min_size=0, max_size=6).map(
    lambda b: b"/k" + bytes(x % 5 + 0x61 if x < 200 else x for x in b)
)
values = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.booleans(),
    st.floats(allow_nan=False),
    st.recursive(st.none() | st.text(max_size=3), lambda c: st.lists(c, max_size=3), max_leaves=6),
)
# Every test that reads runs each Reader implementation ("c" only where it is built),
# and builds its images with the same implementation of the builder's kernels.
impls = pytest.mark.parametrize("impl", reader_mod.IMPLEMENTATIONS)


def _kv(key: bytes, value, rev: int) -> KeyValue:
    return KeyValue(key, b"", rev, rev, 1, 0, value)


def _packed(kv: KeyValue) -> bytes:
    return pack_entry(kv.key, kv.decoded, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def _changes(ref: KeyValues, step: dict, rev: int) -> dict:
    """Apply ``{key: value or None}`` to the reference; the same as builder changes."""
    changes = {}
    for k, v in step.items():
        if v is None:
            ref.remove(k)
            changes[k] = None
        else:
            kv = _kv(k, v, rev)
            ref.upsert(kv)
            changes[k] = _packed(kv)
    return changes


def _publish(pub: publisher.Publisher, b: ImageBuilder) -> None:
    """Publish incrementally (skipping the arena, table slots and order entries a
    buffer already holds) and check the published bytes equal the whole image,
    except the gap between arena and table, which readers never read."""
    parts, total = b.parts()
    # min_gap=8: skip even one-slot runs, so small tables exercise the skipping.
    pub.publish(parts, total, b.revision, len(b), stable=b.stable_span(), reuse=b.reuse(min_gap=8))
    slot = (pub.seq >> 1) & 1
    rec = segment.RECORD.unpack_from(pub.ctrl, segment.OFF_RECORDS + slot * segment.RECORD.size)
    off, length = rec[2], rec[3]
    want = b"".join(bytes(p) for p in parts)
    gap_lo = len(parts[0]) + len(parts[1])
    gap_hi = gap_lo + len(parts[2])
    view, pub_off, pub_len = pub.published()
    with view:
        got = bytes(view[off : off + total])
    assert (pub_off, pub_len) == (off, length)
    assert length == total and got[:gap_lo] == want[:gap_lo] and got[gap_hi:] == want[gap_hi:]


def _check(reader: Reader, ref: KeyValues, probes) -> None:
    assert len(reader) == len(ref)
    for kv in ref:
        e = reader.get(kv.key)
        assert e is not None, kv.key
        assert e.key == entry_key(kv.key) and e.decoded == _norm(kv.decoded)
        assert (e.create_revision, e.mod_revision, e.version, e.lease) == (
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease,
        )
    for p in probes:
        got = reader.get(p)
        want = ref.get(p)
        assert (got is None) == (want is None), p
        lo, hi = sorted((p, p[:-1] if p else p))
        assert [e.key for e in reader.range(lo, hi)] == [entry_key(kv.key) for kv in ref.range(lo, hi)]
        assert [e.key for e in reader.range(p, None)] == [entry_key(kv.key) for kv in ref.range(p, None)]
        assert [e.key for e in reader.prefixed(p[:3])] == [entry_key(kv.key) for kv in ref.prefixed(p[:3])]


def _norm(v):
    """What a value looks like after a msgpack round trip (tuples become lists)."""
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.dictionaries(key_bytes, values, max_size=120), probes=st.lists(key_bytes, max_size=15))
@impls
def test_reader_matches_key_values_after_reset(shm_name, data, probes, impl):
    ref = KeyValues(_kv(k, v, i + 1) for i, (k, v) in enumerate(data.items()))
    b = ImageBuilder()
    b.impl = impl  # the builder's table kernel too (builder.IMPLEMENTATIONS = the readers')
    b.reset(((kv.key, _packed(kv)) for kv in ref), 1000)
    b._check()
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish(pub, b)
        with Reader(shm_name, cache_size=0, implementation=impl) as r:
            assert r.revision == 1000
            _check(r, ref, probes)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.dictionaries(key_bytes, st.one_of(st.none(), values), max_size=40), min_size=1, max_size=12
    ),
    probes=st.lists(key_bytes, max_size=10),
)
@impls
def test_incremental_apply_matches_reference(shm_name, steps, probes, impl):
    """Apply random put/delete batches one by one; the reader always equals the reference."""
    ref = KeyValues()
    b = ImageBuilder()
    b.impl = impl  # the builder's table kernel too (builder.IMPLEMENTATIONS = the readers')
    b.reset([], 0)
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        with_reader = None
        for rev, step in enumerate(steps, start=1):
            b.apply(_changes(ref, step, rev), rev)
            b._check()
            _publish(pub, b)
            if with_reader is None:
                with_reader = Reader(shm_name, cache_size=16, implementation=impl)
            assert with_reader.revision == rev
            _check(with_reader, ref, probes)
        with_reader.close()


@impls
def test_hash_table_survives_heavy_churn(shm_name, impl):
    """Thousands of inserts and deletes through the incremental path (backward-shift
    deletion, table growth, compaction) keep every key findable."""
    rnd = random.Random(7)
    ref = KeyValues()
    b = ImageBuilder()
    b.impl = impl  # the builder's table kernel too (builder.IMPLEMENTATIONS = the readers')
    b.reset([], 0)
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        universe = [f"/c/{i:05d}".encode() for i in range(3000)]
        for rev in range(1, 200):
            step = {k: None if rnd.random() < 0.4 else rev for k in rnd.sample(universe, 30)}
            b.apply(_changes(ref, step, rev), rev)
            if rev % 20 == 0:
                b._check()
        b._check()
        _publish(pub, b)
        with Reader(shm_name, cache_size=0, implementation=impl) as r:
            _check(r, ref, rnd.sample(universe, 50))
            assert [e.key for e in r.range(b"", None)] == [entry_key(kv.key) for kv in ref]


def test_image_view_rejects_bad_headers():
    b = ImageBuilder()
    b.reset([(b"/a", pack_entry(b"/a", 1, 1, 1, 1, 0))], 1)
    parts, total = b.parts()
    img = bytearray(b"".join(bytes(p) for p in parts))
    ImageView(memoryview(bytes(img)), 0, total)  # the valid one parses
    from shmkeyspace.errors import CorruptSegmentError

    bad_magic = bytearray(img)
    bad_magic[0:8] = b"NOTSNAP!"
    with pytest.raises(CorruptSegmentError, match="magic"):
        ImageView(memoryview(bytes(bad_magic)), 0, total)
    bad_version = bytearray(img)
    bad_version[8] = 99
    with pytest.raises(CorruptSegmentError, match="version"):
        ImageView(memoryview(bytes(bad_version)), 0, total)
    with pytest.raises(CorruptSegmentError):
        ImageView(memoryview(bytes(img[: total - 1])), 0, total)


def test_values_readers_cannot_unpack_are_refused():
    with pytest.raises(NotSerializableError, match="cannot be stored"):
        pack_entry(b"/k", {1, 2}, 1, 1, 1, 0)
    with pytest.raises(NotSerializableError):
        pack_entry(b"/k", {1: "int keys"}, 1, 1, 1, 0)
    with pytest.raises(NotSerializableError):
        pack_entry(b"/k", object(), 1, 1, 1, 0)


def test_prefix_end_matches_etcd():
    assert prefix_end(b"/a") == b"/b"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") is None
    assert prefix_end(b"") is None


@impls
def test_compaction_gives_the_space_back(shm_name, impl):
    """Big values put then deleted: compaction shrinks the arena and the image again
    (the table moves back down), and readers still find every key."""
    ref = KeyValues()
    b = ImageBuilder()
    b.impl = impl
    b.reset([], 0)
    small = {f"/s/{i:03d}".encode(): i for i in range(50)}
    b.apply(_changes(ref, small, 1), 1)
    parts, total_small = b.parts()
    big = {f"/b/{i:03d}".encode(): "x" * 20_000 for i in range(50)}
    b.apply(_changes(ref, big, 2), 2)
    _, total_big = b.parts()
    assert total_big > total_small + 50 * 20_000
    b.apply(_changes(ref, dict.fromkeys(big), 3), 3)  # deletes: garbage > half the arena -> compaction
    b._check()
    _, total = b.parts()
    assert b._garbage == 0 and total < total_small + 20_000, (total, total_small)
    with publisher.Publisher(shm_name, unlink_on_close=True) as pub:
        _publish(pub, b)
        with Reader(shm_name, cache_size=0, implementation=impl) as r:
            _check(r, ref, list(small) + list(big))
