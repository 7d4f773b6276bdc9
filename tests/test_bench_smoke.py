"""The benchmark runs end to end and writes well-formed results (``bench/run.py --smoke``).

Runs the real thing at a tiny size (2,000 keys): a private etcd, a Writer process,
readers, peers. Checks the outputs' shape and that every number is sane (finite,
non-negative where it must be) and consistent (p99 >= p50, the right rows); never
timing thresholds, and never whether a target is met.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid

import pytest
from conftest import PYTHON, ROOT

from shmkeyspace.reader import IMPLEMENTATIONS

RUN = os.path.join(ROOT, "bench", "run.py")
TARGET_IDS = {
    "get_cold",
    "get_repeated",
    "range100",
    "prefix100",
    "pss_extra_reader",
    "visibility_p50",
    "publish_1key",
}
READ_SYSTEMS = [
    "shmkeyspace",
    *(["shmkeyspace (python)"] if "c" in IMPLEMENTATIONS else []),
    "shmkeyspace snapshot/batch",
    "lmdb txn/op",
    "lmdb long txn",
    "lmdb txn/batch",
    "dict",
    "etcd (pyetcd)",
    "shared-memory-dict",
]
ORDERED = {"range100", "prefix100"}
BATCHED = {"shmkeyspace snapshot/batch", "lmdb txn/batch"}


def _num(x, *, positive=False):
    assert isinstance(x, (int, float)) and math.isfinite(x), x
    assert x > 0 if positive else x >= 0, x
    return x


# This run's segments carry a tag of their own: another bench on the same host
# (a developer's ./run bench) must not count as this run's leak.
TAG = f"smoke{uuid.uuid4().hex[:8]}"


def _shm_bench_files():
    return {f for f in os.listdir("/dev/shm") if f.startswith((f"shmks.bench-{TAG}-", f"sm_shmksb{TAG}"))}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = _shm_bench_files()
    env = dict(
        os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), SHMKEYSPACE_BENCH_TAG=TAG
    )
    proc = subprocess.run(
        [PYTHON, RUN, "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.json") as f:
        res = json.load(f)
    md = (out / "results.md").read_text()
    # The segments were named with this run's tag, so the leak check below sees them.
    assert f"snapshot bench-{TAG}-" in proc.stderr, proc.stderr[-2000:]
    return {"res": res, "md": md, "stdout": proc.stdout, "out": out, "leaked": _shm_bench_files() - before}


def test_outputs_exist_and_nothing_leaks(smoke):
    assert (smoke["out"] / "results.json").stat().st_size > 0
    assert smoke["md"] == smoke["stdout"]  # the table is also printed
    assert not smoke["leaked"], f"shared memory left behind: {smoke['leaked']}"
    assert smoke["res"]["errors"] == []
    meta = smoke["res"]["meta"]
    assert meta["smoke"] is True and meta["keys"] == [2000] and meta["value_sizes"] == [100]
    _num(meta["duration_s"], positive=True)


def test_reads_rows(smoke):
    rows = smoke["res"]["reads"]
    seen = {(r["scenario"], r["system"]) for r in rows}
    scenarios = ["get_cold", "get_repeated", "range100", "prefix100"]
    for scen in scenarios:
        for system in READ_SYSTEMS:
            if scen in ORDERED and system in BATCHED:
                continue
            assert (scen, system) in seen, (scen, system)
    assert len(rows) == len(seen), "duplicate rows"
    for r in rows:
        assert (r["keys"], r["value_size"]) == (2000, 100)
        if r["us"] is None:
            # Only shared-memory-dict may be missing: no ordered queries (or not installed).
            assert r["system"] == "shared-memory-dict" and r["note"], r
            continue
        _num(r["us"], positive=True)
        assert r["iterations"] > 0
        for x in r["repeats_us"]:
            _num(x, positive=True)


def test_scaling_memory_visibility_writer(smoke):
    res = smoke["res"]
    sc = res["scaling"]
    assert {(r["system"], r["procs"]) for r in sc} == {
        (s, p) for s in ("shmkeyspace", "lmdb txn/op") for p in (1, 2, 4, 8)
    }
    for r in sc:
        _num(r["ops_per_s"], positive=True)
        assert r["per_proc"] == pytest.approx(r["ops_per_s"] / r["procs"])

    mem = res["memory"]
    assert sorted(m["reader_cache"] for m in mem) == [0, 256, 4096]
    for m in mem:
        for k in (
            "reader_pss_mb",
            "reader_uss_mb",
            "mirror_pss_mb",
            "mirror_uss_mb",
            "idle_pss_mb",
            "idle_uss_mb",
            "image_mb",
            "mirror_mb",
        ):
            _num(m[k], positive=True)
        assert math.isfinite(m["extra_reader_mb"]) and math.isfinite(m["pct_of_mirror"])
        # A mirror holds every decoded value; an idle process holds none.
        assert m["mirror_uss_mb"] > m["idle_uss_mb"]

    vis = res["visibility"]
    assert {(v["apply_delay_ms"], v["load"]) for v in vis} == {
        (30.0, "idle"),
        (30.0, "loaded"),
        (0.0, "idle"),
        (0.0, "loaded"),
    }
    for v in vis:
        assert v["samples"] > 0
        _num(v["p50_ms"], positive=True)
        assert v["p99_ms"] >= v["p50_ms"] and v["max_ms"] >= v["p99_ms"]
        _num(v["put_p50_ms"], positive=True)
        if v["load"] == "loaded":
            _num(v["achieved_rate"], positive=True)

    (w,) = res["writer"]
    assert w["one_key"]["publications"] > 0 and w["batch_keys"]["publications"] > 0
    for part in (w["one_key"], w["batch_keys"]):
        for k in ("cpu_total_ms", "wall_total_ms", "cpu_parts_ms", "cpu_publish_ms"):
            _num(part[k], positive=True)
    for k in ("load_s", "writer_start_s", "writer_rss_mb", "writer_anon_mb", "image_mb"):
        _num(w[k], positive=True)


def test_targets_table(smoke):
    res, md = smoke["res"], smoke["md"]
    targets = res["targets"]
    assert {t["id"] for t in targets} == TARGET_IDS
    for t in targets:
        assert isinstance(t["met"], bool), t
        _num(t["value"]) if t["id"] != "pss_extra_reader" else math.isfinite(t["value"])
        if t["ratio"] is not None:
            _num(t["ratio"], positive=True)
    assert "| what | keys | value B | shmkeyspace | vs peer | target | met? |" in md
    table = md.split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert sum(1 for line in table.splitlines() if line.startswith("| ") and "2,000" in line) == len(targets)
    for section in ("## Reads", "## Reader processes", "## Memory", "## Update visibility", "## Writer"):
        assert section in md
