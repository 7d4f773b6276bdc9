"""Benchmark scenarios for ``bench/run.py`` (not part of the library).

Each scenario module exposes ``run(ctx) -> dict`` over one :class:`common.Config`
(a key count and value size, with a live etcd, Writer process and peers set up
by ``run.py``). ``worker.py`` is the entry point of every child process.
"""
