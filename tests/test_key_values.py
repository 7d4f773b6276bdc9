"""KeyValues against a reference model (a sorted list of keys + a dict), with hypothesis.

In the style of sortedcontainers' own tests: every query of KeyValues is compared
with the same query answered by the simplest possible implementation, over keys
drawn from a tiny byte alphabet (so collisions, shared prefixes, 0x00 and 0xff
bytes are common). Also pins prefix_end's edge cases.
"""

from __future__ import annotations

import bisect

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmkeyspace.key_values import KeyValue, KeyValues, prefix_end, to_key

ALPHABET = [0x00, 0x01, ord("a"), ord("b"), 0xFE, 0xFF]

keys = st.lists(st.sampled_from(ALPHABET), max_size=4).map(bytes)
revs = st.integers(min_value=1, max_value=50)
slices = st.tuples(
    st.none() | st.integers(-8, 8), st.none() | st.integers(-8, 8), st.none() | st.integers(1, 3)
)

settings.register_profile("kv", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kv")


def kv(key: bytes, rev: int = 1, value: bytes = b"v", create: int = 1) -> KeyValue:
    return KeyValue(key, value, create, rev, 1, 0, ("decoded", key, rev))


@st.composite
def collections(draw):
    """(KeyValues, reference dict key->KeyValue) built from unique keys in random order."""
    ks = draw(st.lists(keys, unique=True, max_size=25))
    items = [kv(k, draw(revs), draw(st.binary(max_size=3))) for k in ks]
    return KeyValues(items), {it.key: it for it in items}


def ref_sorted(ref):
    return [ref[k] for k in sorted(ref)]


@given(collections())
def test_order_len_iter_index(c):
    kvs, ref = c
    want = ref_sorted(ref)
    assert len(kvs) == len(want)
    assert list(kvs) == want
    for i in range(-len(want), len(want)):
        assert kvs[i] == want[i]
    with pytest.raises(IndexError):
        kvs[len(want)]


@given(collections(), keys)
def test_search_and_get(c, probe):
    kvs, ref = c
    sk = sorted(ref)
    i, found = kvs.search(probe)
    assert (i, found) == (bisect.bisect_left(sk, probe), probe in ref)
    assert kvs.get(probe) == ref.get(probe)
    if found:
        assert kvs[i].key == probe


@given(st.text(alphabet="aé/\u20ac", max_size=4))
def test_str_keys_are_utf8(text):
    kvs = KeyValues([kv(text.encode()), kv(b"\xff")])
    assert kvs.search(text) == kvs.search(text.encode())
    assert kvs.get(text) == kv(text.encode())


@given(collections(), keys, st.none() | keys)
def test_range(c, lo, hi):
    kvs, ref = c
    want = [ref[k] for k in sorted(ref) if k >= lo and (hi is None or k < hi)]
    got = kvs.range(lo, hi)
    assert isinstance(got, KeyValues)
    assert list(got) == want


@given(collections(), keys)
def test_prefixed(c, p):
    kvs, ref = c
    want = [ref[k] for k in sorted(ref) if k.startswith(p)]
    assert list(kvs.prefixed(p)) == want


@given(collections())
def test_prefixed_empty_and_ff(c):
    kvs, ref = c
    assert list(kvs.prefixed(b"")) == ref_sorted(ref)  # empty prefix: everything
    for p in (b"\xff", b"\xff\xff", b"a\xff", b"\x00"):
        assert list(kvs.prefixed(p)) == [ref[k] for k in sorted(ref) if k.startswith(p)]


def test_prefixed_ff_fixed_cases():
    kvs = KeyValues(
        [
            kv(k)
            for k in (
                b"",
                b"a",
                b"a\xff",
                b"a\xff\x00",
                b"a\xff\xff",
                b"b",
                b"\xff",
                b"\xff\xff",
                b"\xff\xff\x00",
            )
        ]
    )
    assert [x.key for x in kvs.prefixed(b"a\xff")] == [b"a\xff", b"a\xff\x00", b"a\xff\xff"]
    assert [x.key for x in kvs.prefixed(b"\xff")] == [b"\xff", b"\xff\xff", b"\xff\xff\x00"]
    assert [x.key for x in kvs.prefixed(b"\xff\xff")] == [b"\xff\xff", b"\xff\xff\x00"]
    assert len(kvs.prefixed(b"")) == len(kvs)
    assert [x.key for x in kvs.prefixed("a")] == [b"a", b"a\xff", b"a\xff\x00", b"a\xff\xff"]


@given(collections(), slices)
def test_slicing(c, sl):
    kvs, ref = c
    s = slice(*sl)
    got = kvs[s]
    assert isinstance(got, KeyValues)
    assert list(got) == ref_sorted(ref)[s]


@given(collections(), st.lists(st.tuples(st.booleans(), keys, revs), max_size=20))
def test_upsert_remove_against_dict(c, ops):
    kvs, ref = c
    for is_upsert, key, rev in ops:
        if is_upsert:
            new = kv(key, rev, b"x%d" % rev)
            assert kvs.upsert(new) == ref.get(key)
            ref[key] = new
        else:
            assert kvs.remove(key) == ref.pop(key, None)
        assert list(kvs) == ref_sorted(ref)
    assert all(kvs.get(k) == v for k, v in ref.items())


@given(collections(), keys, keys)
def test_copy_is_independent(c, k1, k2):
    kvs, ref = c
    before = list(kvs)
    cp = kvs.copy()
    assert cp == kvs and cp is not kvs
    cp.upsert(kv(k1, 99))
    cp.remove(k2)
    assert list(kvs) == before  # the original did not move
    snapshot = list(cp)
    kvs.upsert(kv(k2, 77))
    kvs.remove(k1)
    assert list(cp) == snapshot  # nor does the copy when the original moves


@given(collections(), st.data())
def test_equal_key_revisions(c, data):
    kvs, ref = c
    # Same keys and revisions, other values: equal.
    same = KeyValues([it._replace(value=it.value + b"!", decoded=None) for it in kvs])
    assert kvs.equal_key_revisions(same) and same.equal_key_revisions(kvs)
    assert kvs.equal_key_revisions(kvs.copy())
    if not ref:
        assert not kvs.equal_key_revisions(KeyValues([kv(b"z")]))
        return
    i = data.draw(st.integers(0, len(kvs) - 1))
    changed_mod = kvs.copy()
    changed_mod.upsert(kvs[i]._replace(mod_revision=kvs[i].mod_revision + 1))
    assert not kvs.equal_key_revisions(changed_mod)
    changed_create = kvs.copy()
    changed_create.upsert(kvs[i]._replace(create_revision=kvs[i].create_revision + 1))
    assert not kvs.equal_key_revisions(changed_create)
    shorter = kvs.copy()
    shorter.remove(kvs[i].key)
    assert not kvs.equal_key_revisions(shorter) and not shorter.equal_key_revisions(kvs)
    # Same length, one key renamed (same revisions): not equal.
    renamed = kvs.copy()
    old = renamed.remove(kvs[i].key)
    newkey = kvs[i].key + b"\x00"
    if newkey not in ref:
        renamed.upsert(old._replace(key=newkey))
        assert len(renamed) == len(kvs) and not kvs.equal_key_revisions(renamed)


@given(st.lists(keys, min_size=1, max_size=10), st.data())
def test_duplicate_keys_rejected(ks, data):
    dup = data.draw(st.sampled_from(ks))
    with pytest.raises(ValueError, match="duplicate key"):
        KeyValues([kv(k) for k in ks] + [kv(dup, 5)])


def test_duplicate_message_names_the_key():
    with pytest.raises(ValueError, match=r"b'/k'"):
        KeyValues([kv(b"/a"), kv(b"/k"), kv(b"/k", 2)])


def test_to_key_rejects_other_types():
    with pytest.raises(TypeError):
        to_key(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        KeyValues().get(None)  # type: ignore[arg-type]


def test_keys_accepted_like_reader():
    """str, bytes, bytearray and memoryview name the same key, as in Reader; range's
    bounds are (from_key, to_key) as in Reader.range."""
    kvs = KeyValues([kv(b"/a"), kv(b"/b"), kv(b"/c")])
    for k in ("/b", b"/b", bytearray(b"/b"), memoryview(b"/b")):
        got = kvs.get(k)
        assert got is not None and got.key == b"/b", k
    assert [x.key for x in kvs.range(from_key=bytearray(b"/a"), to_key=memoryview(b"/c"))] == [b"/a", b"/b"]
    assert [x.key for x in kvs.range("/b", None)] == [b"/b", b"/c"]


@pytest.mark.parametrize(
    "prefix, end",
    [
        (b"", None),
        (b"\xff", None),
        (b"\xff\xff\xff", None),
        (b"a", b"b"),
        (b"/a", b"/b"),
        (b"a\xff", b"b"),
        (b"a\xff\xff", b"b"),
        (b"\x00", b"\x01"),
        (b"ab\xfe", b"ab\xff"),
        (b"\xfe\xff", b"\xff"),
    ],
)
def test_prefix_end_cases(prefix, end):
    assert prefix_end(prefix) == end


@given(st.lists(st.sampled_from(ALPHABET), max_size=5).map(bytes), st.lists(keys, max_size=30))
def test_prefix_end_bounds_exactly_the_prefixed_keys(p, ks):
    end = prefix_end(p)
    for k in ks + [p, p + b"\x00", p + b"\xff"]:
        inside = k >= p and (end is None or k < end)
        assert inside == k.startswith(p), (p, end, k)
