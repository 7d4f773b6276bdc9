"""The compiled read path against its Python reference, piece by piece.

The whole-Reader comparisons (property tests vs KeyValues, torture, threads,
fuzz) are parametrized over implementations elsewhere; here: the C xxh3_64
against the xxhash module at every length the C code handles itself and
beyond, the C msgpack decoder against the readers' unpacker (ormsgpack) on
random values, and how the implementation is chosen and reported.
"""

from __future__ import annotations

import json
import random
import subprocess

import helpers_procs as hp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmkeyspace import reader as reader_mod
from shmkeyspace.errors import CorruptSegmentError
from shmkeyspace.snapshot import key_hash, pack_entry, unpackb

if "c" not in reader_mod.IMPLEMENTATIONS:  # not built, or SHMKEYSPACE_PURE_PYTHON=1
    pytest.skip("the compiled read path is not in use", allow_module_level=True)
from shmkeyspace import _speedups as sp  # noqa: E402

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=5),
    max_leaves=20,
)


def test_hash_matches_xxhash_at_every_length():
    rnd = random.Random(13)
    for n in range(0, 300):
        for _ in range(8):
            b = rnd.randbytes(n)
            assert sp.key_hash(b) == key_hash(b), n
    assert sp.key_hash(b"") == key_hash(b"") and sp.key_hash(b"x" * 5000) == key_hash(b"x" * 5000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.binary(max_size=70), value=values, revs=st.lists(st.integers(0, 2**63 - 1), min_size=4, max_size=4)
)
def test_decoder_matches_the_unpacker(key, value, revs):
    packed = pack_entry(key, value, *revs)
    e = sp.unpack_entry(packed)
    assert type(e) is reader_mod.Entry
    assert list(e) == unpackb(packed)


def test_decoder_rejects_garbage_with_own_errors():
    rnd = random.Random(5)
    good = pack_entry(b"/k", {"a": [1, 2.5, "x", b"y", None, True]}, 1, 2, 3, 4)
    for _ in range(3000):
        bad = bytearray(good[: rnd.randrange(len(good) + 1)])
        for _ in range(rnd.randrange(4)):
            if bad:
                bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        try:
            sp.unpack_entry(bytes(bad))
        except (CorruptSegmentError, ValueError):
            pass
    # Types this decoder leaves to the unpacker (ext, deep nesting) are still read.
    deep = [[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]
    for _ in range(9):
        deep = [deep] * 1
    packed = pack_entry(b"/k", deep, 1, 1, 1, 0)
    assert list(sp.unpack_entry(packed)) == unpackb(packed)


def _child(env_value: str, code: str) -> str:
    env = hp.child_env({"SHMKEYSPACE_PURE_PYTHON": env_value})
    return subprocess.run(
        [hp.PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def test_implementation_is_chosen_and_can_be_forced():
    code = "from shmkeyspace import Reader; print(Reader.implementation)"
    assert _child("0", code) == "c"
    assert _child("1", code) == "python"
    assert reader_mod.IMPLEMENTATIONS == ("c", "python")
    with pytest.raises(ValueError, match="implementation"):
        reader_mod.Reader("x", implementation="rust")


def test_stat_reports_the_implementation(shm_name):
    from shmkeyspace import publisher
    from shmkeyspace.builder import ImageBuilder

    pub = publisher.Publisher(shm_name)
    try:
        b = ImageBuilder()
        b.reset([(b"/a", pack_entry(b"/a", 1, 1, 1, 1, 0))], 1)
        parts, total = b.parts()
        pub.publish(parts, total, 1, 1)
        for env_value, want in (("0", "c"), ("1", "python")):
            out = subprocess.run(
                [hp.PYTHON, "-m", "shmkeyspace", "stat", shm_name, "--json"],
                env=hp.child_env({"SHMKEYSPACE_PURE_PYTHON": env_value}),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["reader_implementation"] == want
    finally:
        pub.close(unlink=True)
