"""State files (shmkeyspace/state.py): round trip, atomic write, trust checks, fuzz.

The fuzz cases write real files into a temp dir and read them through
:func:`state.load` and :meth:`ImageBuilder.adopt` exactly as a starting writer does.
Promises checked: a damaged, truncated, foreign or hostile file gives a reason
string (never another exception, never a hang: each case runs under an interval
timer), a file that is accepted yields a builder whose invariants hold
(``_check``), and the compiled and Python kernels of ``adopt`` give the same
verdict and the same builder on every case.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import struct
import threading

import msgpack
import pytest
from xxhash import xxh3_128

from shmkeyspace import publisher, state
from shmkeyspace.builder import IMPLEMENTATIONS, ImageBuilder
from shmkeyspace.errors import CorruptSegmentError, StateFileError
from shmkeyspace.reader import Reader
from shmkeyspace.snapshot import ImageView, entry_key, pack_entry, unpackb
from shmkeyspace.writer import Writer

NAME, PREFIX, DECODER = "svc", "/svc", "json"


def _adopt(sf, impl):
    """(builder, top) as the writer takes the file over, or the reason it refuses it."""
    view = sf.view()
    try:
        return ImageBuilder.adopt(view, sf.prefix.encode(), impl=impl)
    except CorruptSegmentError as exc:
        return str(exc)
    finally:
        view.release()


def _image(n: int = 50, rev: int = 1000, churn: bool = False):
    """(parts, length, count, items) of an image of ``n`` keys under PREFIX."""
    b = ImageBuilder()
    items = []
    for i in range(n):
        k = f"{PREFIX}/k{i:05d}".encode()
        v = {"i": i, "s": "x" * (i % 7)}
        items.append((k, pack_entry(k, v, 10 + i, 10 + i, 1, 0)))
    b.reset(items, rev)
    if churn:  # an arena with garbage and out-of-order entries, as a live writer has
        b.apply({items[3][0]: pack_entry(items[3][0], "new", 13, rev, 2, 0), items[4][0]: None}, rev)
    parts, total = b.parts()
    return parts, total, len(b), b


def _write(d, n=50, rev=1000, churn=False, **kw):
    parts, total, count, _ = _image(n, rev, churn)
    args = dict(name=NAME, prefix=PREFIX, decoder=DECODER, cluster_id=77, revision=rev, count=count)
    args.update(kw)
    return state.write(str(d), parts=parts, length=total, **args), b"".join(bytes(p) for p in parts)


def test_round_trip(tmp_path):
    path, image = _write(tmp_path, churn=True)
    assert path == str(tmp_path / "svc.snap")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sf = state.read(str(tmp_path), NAME, PREFIX, DECODER)
    assert (sf.cluster_id, sf.revision, sf.count, sf.image) == (77, 1000, 49, image)
    for impl in IMPLEMENTATIONS:
        b, top = _adopt(sf, impl)
        b._check()
        assert len(b) == 49 and b.keys == sorted(b.keys) and b.mod_revision(b"/svc/k00003") == 1000
        assert unpackb(b.packed(b"/svc/k00003"))[1] == "new"
        assert top == (b"/svc/k00003", 13, 1000, 2)  # the most recently modified key
        assert b.revision == 1000 and b.impl == impl
    assert not [f for f in os.listdir(tmp_path) if f != "svc.snap"]  # no temp left


def test_appended_part_is_read_in_chunks(tmp_path, monkeypatch):
    # A (bytearray, n) part: only the first n bytes count, even after the owner appends.
    monkeypatch.setattr(state, "CHUNK", 7)
    parts, total, count, b = _image()
    arena = parts[1]
    n = len(arena)
    parts = list(parts)
    parts[1] = (arena, n)
    arena += b"garbage appended by the writer"
    state.write(
        str(tmp_path), NAME, PREFIX, DECODER, 77, 1000, count, parts, total, mode=0o640, gid=os.getgid()
    )
    sf = state.read(str(tmp_path), NAME, PREFIX, DECODER)
    assert len(_adopt(sf, IMPLEMENTATIONS[0])[0]) == count
    assert stat.S_IMODE(os.stat(tmp_path / "svc.snap").st_mode) == 0o640


def test_identity_mismatches_are_refused(tmp_path):
    _write(tmp_path)
    for kw, word in (
        ({"name": "other"}, "snapshot"),
        ({"prefix": "/sv"}, "prefix"),
        ({"decoder": "raw"}, "decoded"),
    ):
        args = dict(name=NAME, prefix=PREFIX, decoder=DECODER)
        args.update(kw)
        if "name" in kw:
            os.rename(tmp_path / "svc.snap", tmp_path / "other.snap")
        with pytest.raises(StateFileError, match=word):
            state.read(str(tmp_path), args["name"], args["prefix"], args["decoder"])
        if "name" in kw:
            os.rename(tmp_path / "other.snap", tmp_path / "svc.snap")


def test_untrusted_files_are_refused(tmp_path):
    path, _ = _write(tmp_path)
    d = str(tmp_path)
    os.chmod(path, 0o620)
    with pytest.raises(StateFileError, match="writable by users other than its owner"):
        state.read(d, NAME, PREFIX, DECODER)
    os.chmod(path, 0o600)
    os.chown(path, 12345, -1)
    with pytest.raises(StateFileError, match="owned by uid 12345"):
        state.read(d, NAME, PREFIX, DECODER)
    assert state.read(d, NAME, PREFIX, DECODER, uid=12345).revision == 1000
    os.chown(path, os.geteuid(), -1)
    os.rename(path, tmp_path / "real")
    os.symlink(tmp_path / "real", path)
    with pytest.raises(StateFileError, match="symbolic link"):
        state.read(d, NAME, PREFIX, DECODER)
    os.unlink(path)
    os.mkfifo(path, 0o600)  # a FIFO must not block the open
    with pytest.raises(StateFileError, match="not a regular file"):
        state.read(d, NAME, PREFIX, DECODER)
    os.unlink(path)
    os.mkdir(path, 0o700)
    with pytest.raises(StateFileError, match="not a regular file"):
        state.read(d, NAME, PREFIX, DECODER)
    os.rmdir(path)
    assert state.load(d, NAME, PREFIX, DECODER) == (None, "no state file")


def test_untrusted_dir_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o1777)
    with pytest.raises(StateFileError, match="writable by users other than its owner"):
        state.prepare_dir(str(d))
    os.chmod(d, 0o700)
    os.chown(d, 12345, -1)
    with pytest.raises(StateFileError, match="owned by uid 12345"):
        state.prepare_dir(str(d))
    os.chown(d, os.geteuid(), -1)
    assert state.prepare_dir(str(d)) == str(d)
    assert state.prepare_dir(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")


def test_temps_of_a_dead_writer_are_removed(tmp_path):
    (tmp_path / ".svc.snap.tmp.1.2").write_bytes(b"half")
    (tmp_path / ".svc.snap.prev").write_bytes(b"a link left mid-swap")
    (tmp_path / ".svc.snap.spare").write_bytes(b"kept: the next write overwrites it")
    (tmp_path / ".other.snap.tmp.1.2").write_bytes(b"not ours")
    assert state.remove_temps(str(tmp_path), NAME) == 2
    assert sorted(os.listdir(tmp_path)) == [".other.snap.tmp.1.2", ".svc.snap.spare"]


def test_writes_reuse_a_spare_inode_and_survive_a_crash_mid_swap(tmp_path):
    """Each write overwrites the spare in place and renames it over NAME.snap; the old
    file becomes the spare. A crash mid-swap (a stale .prev link, a spare that is the
    live file's inode, a longer old spare) never damages NAME.snap."""
    d = str(tmp_path)
    final = tmp_path / "svc.snap"
    inodes = []
    for rev in (1000, 1001, 1002, 1003):
        _, image = _write(tmp_path, n=50 + rev % 7, rev=rev)
        assert state.read(d, NAME, PREFIX, DECODER).image == image
        inodes.append(os.stat(final).st_ino)
    assert inodes[0] == inodes[2] and inodes[1] == inodes[3] and inodes[0] != inodes[1]
    assert sorted(os.listdir(tmp_path)) == [".svc.snap.spare", "svc.snap"]
    # A crash after linking the live file as .prev, before the rename.
    os.link(final, tmp_path / ".svc.snap.prev")
    _, image = _write(tmp_path, n=20, rev=1004)
    assert state.read(d, NAME, PREFIX, DECODER).image == image
    # The spare hard-linked to the live file: it must not be overwritten in place.
    os.unlink(tmp_path / ".svc.snap.spare")
    os.link(final, tmp_path / ".svc.snap.spare")
    before = final.read_bytes()
    _, image = _write(tmp_path, n=70, rev=1005)
    assert state.read(d, NAME, PREFIX, DECODER).image == image
    assert (tmp_path / ".svc.snap.spare").read_bytes() == before  # the old file, intact
    assert sorted(os.listdir(tmp_path)) == [".svc.snap.spare", "svc.snap"]


def _reseal(data: bytearray) -> bytearray:
    """Recompute the checksum: what a hostile writer (or a bug) would produce."""
    data[-16:] = xxh3_128(bytes(data[:-16])).digest()
    return data


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _publish_before(name: str) -> None:
    """Publish a 1-key image that no writer continues from (no cluster id or identity
    in its record): a Writer's restore then has only the state file to go by, instead
    of taking over an earlier case's image that is still in shared memory."""
    with publisher.Publisher(name) as pub:
        b0 = ImageBuilder()
        b0.reset([(b"/svc/k00000", pack_entry(b"/svc/k00000", "before", 1, 1, 1, 0))], 1)
        parts, total = b0.parts()
        pub.publish(parts, total, 1, 1)


def _case(d: str, data: bytes, name: str, r: Reader) -> str:
    """Write ``data`` as the state file and load it like a writer: 'ok' or the reason.

    Two ways in: :func:`state.load` (into bytes) plus :meth:`ImageBuilder.adopt`
    with each kernel set, and a real Writer's :meth:`~Writer.restore` (the file read
    straight into shared memory, every entry checked before it is published). They
    must agree, and a refused file must leave readers on what they had.
    """
    with open(state.path_for(d, name), "wb") as f:
        f.write(data)
    sf, reason = state.load(d, name, PREFIX, DECODER)
    got = {impl: _adopt(sf, impl) for impl in IMPLEMENTATIONS} if sf is not None else {}
    verdicts = {impl: type(g) is str for impl, g in got.items()}
    assert len(set(verdicts.values())) <= 1, f"the kernels disagree: {got}"
    if got and isinstance(next(iter(got.values())), str):
        reason = next(iter(got.values()))
    _publish_before(name)
    before = (r.revision, r.get(b"/svc/k00000"))
    w = Writer(name, PREFIX, endpoints="127.0.0.1:1", decoder_name=DECODER, state_dir=d)
    try:
        restored = w.restore()
    finally:
        w.stop()
    assert restored == (not reason), f"bytes path: {reason!r}, the writer's restore: {restored}"
    if not restored:
        assert reason
        assert (r.revision, r.get(b"/svc/k00000")) == before, "a refused file reached readers"
        return reason
    assert sf is not None and r.revision == sf.revision and len(r) == sf.count
    b, top = next(iter(got.values()))  # type: ignore[misc]
    b._check()
    assert len(b) == sf.count
    assert [e.key for e in r.range(b"/svc/", b"/svc0")] == [entry_key(k) for k in b.keys]
    for other, other_top in list(got.values())[1:]:  # type: ignore[misc]
        assert (other.keys, other.arena, other._order, other._garbage, top) == (
            b.keys,
            b.arena,
            b._order,
            b._garbage,
            other_top,
        )
    return "ok"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs SIGALRM")
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_state_files(tmp_path, seed, shm_name):
    rng = random.Random(seed)
    d = str(tmp_path)
    _, good = _write(tmp_path, n=60, churn=True, name=shm_name)  # the writer restores its own name's file
    with open(state.path_for(d, shm_name), "rb") as f:
        pristine = f.read()
    head_len = struct.unpack_from("<I", pristine, 12)[0]
    counts = {"refused": 0, "accepted": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    _publish_before(shm_name)  # what readers have before the first case
    r = Reader(shm_name)
    try:
        for i in range(1500):
            kind = i % 6
            data = bytearray(pristine)
            if kind == 0:  # truncated anywhere (a crash mid-copy, a full disk)
                data = data[: rng.randrange(len(data))]
            elif kind == 1:  # bit flips anywhere, checksum left alone
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif kind == 2:  # hostile: bit flips or runs, checksum recomputed
                for _ in range(rng.randint(1, 4)):
                    at = rng.randrange(len(data) - 16)
                    if rng.random() < 0.5:
                        data[at] ^= 1 << rng.randrange(8)
                    else:
                        run = rng.randint(1, 16)
                        data[at : at + run] = bytes([rng.choice((0, 0xFF, rng.randrange(256)))]) * len(
                            data[at : at + run]
                        )
                _reseal(data)
            elif kind == 3:  # hostile head fields: huge or negative lengths, resealed
                field = rng.choice(((4, "<I"), (12, "<I"), (24, "<q"), (32, "<Q"), (40, "<Q"), (56, "<H")))
                off, fmt = field
                big = rng.choice((0, 1, 2**31 - 1, 2**32 - 1, 2**62, -1))
                try:
                    struct.pack_into(fmt, data, off, big)
                except struct.error:
                    struct.pack_into(fmt, data, off, 0)
                _reseal(data)
            elif kind == 4:  # hostile image header or index, resealed
                at = head_len + rng.randrange(min(128, len(data) - head_len - 16))
                if rng.random() < 0.5:
                    at = head_len + rng.randrange(len(good))
                data[at] = rng.randrange(256)
                _reseal(data)
            else:  # foreign: random bytes, or another format's file
                data = bytearray(rng.randbytes(rng.randrange(0, 400)))
                if rng.random() < 0.5:
                    data[:8] = b"SHMKSTAT"
                    data = _reseal(data + bytes(16)) if len(data) > 16 else data
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                out = _case(d, bytes(data), shm_name, r)
            except _Timeout:
                pytest.fail(f"seed {seed} case {i} (kind {kind}) took over 5 s")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if kind in (0, 1, 5):
                assert out != "ok" or bytes(data) == pristine, f"seed {seed} case {i} kind {kind} accepted"
            counts["accepted" if out == "ok" else "refused"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
        r.close()
    # Most hostile cases are caught too; some flips land in values and stay valid.
    assert counts["refused"] > 1000, counts


_DEEP: list = [0]
for _ in range(250):
    _DEEP = [_DEEP]


def _odd_values(rng: random.Random):
    """Values of every msgpack type, including what the readers' unpacker refuses."""
    pool = [
        None,
        True,
        -1,
        -(2**40),
        2**63 - 1,
        2**64 - 1,
        1.5,
        "é" * 3,
        "x" * 40,
        b"\xff\x00",
        [1, [2, [3, {"k": "v"}]]],
        {"a": 1, "b": [None, False]},
    ]
    bad = [
        {1: 2},  # a non-str map key
        {b"k": 1},
        msgpack.ExtType(5, b"ext"),
        _DEEP,  # past the compiled skipper's depth limit: the unpacker decides
    ]
    return rng.choice(bad if rng.random() < 0.03 else pool)


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="the compiled kernels are not built")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adopt_kernels_agree_on_hostile_entries(seed):
    """The compiled entry scan against the Python reference, on entries a hostile file could hold.

    Each case packs entries with odd values and revisions (some valid, some
    not), then overwrites random arena bytes; both kernels must accept or both
    refuse, and accepted builders must be identical and pass ``_check``.
    """
    rng = random.Random(seed)
    verdicts = {"ok": 0, "refused": 0}
    for case in range(300):
        items = []
        for i in range(rng.randint(1, 12)):
            r = rng.random()
            # short keys; a non-UTF-8 one (a bin key); one over 240 bytes (hashed by the xxhash module)
            k = (
                f"/svc/k{i:03d}".encode()
                if r < 0.85
                else b"/svc/\xff" + bytes([i])
                if r < 0.93
                else b"/svc/" + b"L" * 300 + bytes([65 + i])
            )
            c = rng.choice((1, 5, 10))
            e = [entry_key(k), _odd_values(rng), c, c + rng.choice((0, 3)), rng.choice((1, 2, 2**64 - 1)), 0]
            if rng.random() < 0.04:  # one impossible or mistyped field
                e[rng.randrange(2, 6)] = rng.choice((-1, 0, 2**63, 2**64 - 1, True, 1.0, "1", None))
            items.append((k, msgpack.packb(e, use_bin_type=True)))
        items = sorted(dict(items).items())
        b = ImageBuilder()
        b.reset(items, 20)
        parts, _ = b.parts()
        img = bytearray(b"".join(bytes(p) for p in parts))
        arena_off, arena_len = struct.unpack_from(
            "<QQ", img, 32
        )  # HEADER: after magic, version, step, revision, count
        for _ in range(rng.choice((0, 0, 0, 1, 3))):
            at = arena_off + rng.randrange(arena_len)
            img[at] = rng.choice(
                (0x00, 0x7F, 0x90, 0x96, 0xA0, 0xC1, 0xC7, 0xD4, 0xDC, 0xDF, 0xFF, rng.randrange(256))
            )
        view = ImageView(memoryview(bytes(img)), 0, len(img))
        got = {}
        for impl in IMPLEMENTATIONS:
            try:
                got[impl] = ImageBuilder.adopt(view, b"/svc/", impl=impl)
            except CorruptSegmentError as exc:
                got[impl] = str(exc)
        c_got, py_got = got["c"], got["python"]
        assert type(c_got) is type(py_got), f"seed {seed} case {case}: c {c_got!r} python {py_got!r}"
        if isinstance(c_got, str):
            verdicts["refused"] += 1
            continue
        verdicts["ok"] += 1
        (cb, ctop), (pb, ptop) = c_got, py_got
        cb._check()
        assert (cb.keys, cb.arena, cb._order, cb._garbage, ctop) == (
            pb.keys,
            pb.arena,
            pb._order,
            pb._garbage,
            ptop,
        )
        pb._check()
    assert verdicts["ok"] > 20 and verdicts["refused"] > 20, verdicts


def _resealed_image(img: bytearray) -> bytearray:
    """Recompute the image's index checksum after its index was edited (a hostile image)."""
    from shmkeyspace.snapshot import HASHED_HEAD, HEADER, HEADER_SIZE, index_checksum

    f = HEADER.unpack_from(img, 0)
    table_off, slots, order_off, order_len, fence_off, fence_len = f[7], f[8], f[9], f[10], f[11], f[12]
    struct.pack_into(
        "<Q",
        img,
        HASHED_HEAD,
        index_checksum(
            img[:HEADER_SIZE],
            img[table_off : table_off + 16 * slots],
            img[order_off : order_off + order_len],
            img[fence_off : fence_off + fence_len],
        ),
    )
    return img


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="the compiled kernels are not built")
def test_split_scan_agrees_with_one_pass(monkeypatch):
    """scan_image checks big images in two halves on two threads: same Top, same
    verdicts, bad entries named by their index in the image, and the order across
    the seam checked too."""
    from shmkeyspace import kernels
    from shmkeyspace.builder import scan_image
    from shmkeyspace.snapshot import HEADER

    monkeypatch.setattr(kernels, "SPLIT_SCAN", 4)
    items = [(f"/svc/k{i:02d}".encode(), i) for i in range(10)]
    b = ImageBuilder()
    b.reset([(k, pack_entry(k, i, 1, 10 + (i * 7) % 10, 1, 0)) for k, i in items], 100)
    parts, _ = b.parts()
    good = bytearray(b"".join(bytes(p) for p in parts))

    def verdicts(img):
        view = ImageView(memoryview(bytes(img)), 0, len(img))
        out = []
        for impl in ("c", "python"):
            try:
                out.append(scan_image(view, b"/svc/", impl))
            except CorruptSegmentError as exc:
                out.append(str(exc))
        return out

    c, py = verdicts(good)
    assert c == py == (b"/svc/k07", 1, 19, 1)  # the greatest mod_revision is in the second half
    # An entry in the second half with an impossible revision: both name entry 8.
    bad = ImageBuilder()
    bad.reset([(k, pack_entry(k, i, 1, 200 if i == 8 else 10, 1, 0)) for k, i in items], 100)
    parts, _ = bad.parts()
    c, py = verdicts(bytearray(b"".join(bytes(p) for p in parts)))
    assert c.startswith("entry 8 ") and py.startswith("entry 8 "), (c, py)
    # Entries 4 and 5 swapped in the order array (resealed): each half is sorted, the seam is not.
    order_off = HEADER.unpack_from(good, 0)[9]
    img = bytearray(good)
    a, z = order_off + 8 * 4, order_off + 8 * 5
    img[a : a + 8], img[z : z + 8] = good[z : z + 8], good[a : a + 8]
    c, py = verdicts(_resealed_image(img))
    assert "not sorted" in c and "not sorted" in py, (c, py)
