"""The opt-in reliability soak: the fault and fuzz tests at large counts, one table.

    ./run bench --only soak                       # SHMKEYSPACE_SOAK=1 sizes (~20-40 min on 2 cores)
    ./run bench --only soak -k "sigkill"          # a subset (extra arguments go to pytest)

Runs ``tests/test_torture.py``, ``test_reliability.py`` and ``test_fuzz_segment.py``
under ``SHMKEYSPACE_SOAK=1`` (2 minutes of seqlock torture per reader path, 60
writer kills, 100k fuzz cases, 100k publications, a 1M-key prefix; each size can be overridden by the ``SHMKEYSPACE_SOAK_*``
variables the tests read). Every test appends what it injected and checked to
``$SHMKEYSPACE_SOAK_REPORT``; this script sums that into ``soak.md`` and
``soak.json`` in ``--out`` (default ``bench/results/``) and prints the table.
Exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = ["tests/test_torture.py", "tests/test_reliability.py", "tests/test_fuzz_segment.py"]


def collect(path: str) -> List[Dict]:
    """Sum the JSON lines of one report per test name, in first-seen order."""
    rows: Dict[str, Dict] = {}
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            row = rows.setdefault(
                rec["test"],
                {
                    "test": rec["test"],
                    "runs": 0,
                    "faults": 0,
                    "answers": 0,
                    "inconsistencies": 0,
                    "extra": {},
                },
            )
            row["runs"] += 1
            for k in ("faults", "answers", "inconsistencies"):
                row[k] += int(rec.get(k, 0))
            row["extra"].update(
                {k: v for k, v in rec.items() if k not in ("test", "faults", "answers", "inconsistencies")}
            )
    return list(rows.values())


def table(rows: List[Dict]) -> str:
    out = [
        "| fault or input | faults injected | answers checked | inconsistencies | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r["extra"].items())
        out.append(f"| {r['test']} | {r['faults']:,} | {r['answers']:,} | {r['inconsistencies']} | {notes} |")
    tot = {k: sum(r[k] for r in rows) for k in ("faults", "answers", "inconsistencies")}
    out.append(
        f"| **total** | **{tot['faults']:,}** | **{tot['answers']:,}** | **{tot['inconsistencies']}** | |"
    )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args, pytest_args = ap.parse_known_args(argv)
    os.makedirs(args.out, exist_ok=True)
    fd, report = tempfile.mkstemp(prefix="shmkeyspace-soak-", suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ, SHMKEYSPACE_SOAK="1", SHMKEYSPACE_SOAK_REPORT=report)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "timeout=3600",
        *TESTS,
        *pytest_args,
    ]
    print("$ SHMKEYSPACE_SOAK=1 " + " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    seconds = time.monotonic() - t0
    rows = collect(report)
    os.unlink(report)
    md = (
        f"Soak of {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}: `./run bench --only soak` took {seconds / 60:.1f} min, "
        f"pytest exit status {rc}.\n\n" + table(rows) + "\n"
    )
    with open(os.path.join(args.out, "soak.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(
            {
                "seconds": round(seconds, 1),
                "pytest_exit": rc,
                "rows": rows,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            },
            f,
            indent=1,
        )
    print("\n" + md)
    return rc


if __name__ == "__main__":
    sys.exit(main())
