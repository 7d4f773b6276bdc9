"""The code in README.md and docs/*.md runs, and the README's links lead somewhere.

Convention: a fenced ```python block directly after the HTML comment
``<!-- test: run -->`` is executed here against the session etcd; after
``<!-- test: run with-writer -->`` it runs while a writer (JSON decoder) mirrors
PREFIX into the snapshot NAME, with three keys ``PREFIX + "api/host-N"`` holding
``{"host": "10.0.0.N", "addr": "10.0.0.N:8080"}``. A block sets its settings as
top-level ``ENDPOINTS = ...``, ``PREFIX = ...`` and ``NAME = ...`` lines; the
test replaces those values with the session etcd's endpoint, a fresh prefix
(ending in "/") and a fresh snapshot name. Blocks that need gunicorn, systemd or
a foreign etcd carry no marker.
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest

from shmkeyspace import Writer
from shmkeyspace.decoders import json as json_decoder
from shmkeyspace.etcd import connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKER = re.compile(r"^<!--\s*test:\s*run(?:\s+(with-writer))?\s*-->\s*$")
SETTING = re.compile(r"^(ENDPOINTS|PREFIX|NAME) = .*$", re.M)


def _blocks():
    """(id, path, first line, mode, code) of every marked block, in file order."""
    out = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        i = 0
        while i < len(lines):
            m = MARKER.match(lines[i])
            if not m:
                i += 1
                continue
            assert i + 1 < len(lines) and lines[i + 1].strip() == "```python", (
                f"{path}:{i + 1}: a test marker must come directly before a ```python block"
            )
            end = lines.index("```", i + 2)
            rel = os.path.relpath(path, ROOT)
            out.append((f"{rel}:{i + 3}", path, i + 3, m.group(1) or "plain", "\n".join(lines[i + 2 : end])))
            i = end + 1
    return out


BLOCKS = _blocks()


def test_readme_has_a_runnable_quickstart():
    assert any(b[0].startswith("README.md:") for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_example_runs(block, etcd_server, prefix, shm_name, capsys):
    where, path, line, mode, code = block
    values = {"ENDPOINTS": etcd_server.endpoint, "PREFIX": prefix + "/", "NAME": shm_name}
    code = SETTING.sub(lambda m: f"{m.group(1)} = {values[m.group(1)]!r}", code)
    # Keep line numbers in tracebacks pointing into the document.
    compiled = compile("\n" * (line - 1) + code, path, "exec")
    writer = None
    if mode == "with-writer":
        client = connect(etcd_server.endpoint)
        try:
            for n in (1, 2, 3):
                value = {"host": f"10.0.0.{n}", "addr": f"10.0.0.{n}:8080"}
                client.put(f"{prefix}/api/host-{n}", json.dumps(value))
        finally:
            client.close()
        writer = Writer(shm_name, prefix + "/", endpoints=etcd_server.endpoint, decoder=json_decoder).start()
    try:
        exec(compiled, {"__name__": "__docs_example__"})
    finally:
        if writer is not None:
            writer.stop()
    capsys.readouterr()  # examples print; what matters is that they ran


def _slug(heading: str) -> str:
    """The anchor of a heading, as mkdocs' toc and GitHub make it for ASCII headings."""
    s = re.sub(r"[`*_]", "", heading.strip()).lower()
    s = re.sub(r"[^\w\s-]", "", s)
    return re.sub(r"\s+", "-", s).strip("-")


def _anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def test_readme_links_point_at_files_that_exist():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    bad = []
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = os.path.join(ROOT, target) if target else os.path.join(ROOT, "README.md")
        if not os.path.exists(path):
            bad.append(f"{link}: no such file")
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            bad.append(f"{link}: no heading with that anchor")
    assert not bad, bad
