"""asyncio waiters follow a writer that re-created the name's segments (issue 25).

The aio notifier keeps a mapping of its own of the control block; when that block
is retired (its writer stopped with ``--unlink-on-exit``) the waiters re-check
every slice, their Reader follows the name to the new writer's block, and the
notifier maps that one. Real etcd, real writer processes.
"""

from __future__ import annotations

import asyncio
import json

import test_cli

from shmkeyspace import Reader, aio
from shmkeyspace.etcd import connect

WriterProc = test_cli.WriterProc
writers = test_cli.writers  # the fixture


def test_an_async_waiter_follows_a_writer_restarted_on_new_segments(
    etcd_server, prefix, shm_name, python_env, tmp_path, writers
):
    c = connect(etcd_server.endpoint)
    try:
        c.put(f"{prefix}/x", json.dumps(1))
        w1 = WriterProc(
            python_env,
            tmp_path,
            etcd_server.endpoint,
            prefix,
            shm_name,
            "--decoder",
            "json",
            "--unlink-on-exit",
        )
        writers.append(w1)
        w1.wait_published(int(c.get_response(b"\0p").header.revision))
        with Reader(shm_name) as r:

            async def main() -> bool:
                loop = asyncio.get_running_loop()
                start = r.revision
                # No timeout of its own: without the notifier following the name it
                # would sleep on the retired block forever, and wait_for below fails.
                waiter = asyncio.ensure_future(aio.wait_for_revision(r, start + 1, None))
                await asyncio.sleep(0.1)
                assert not waiter.done()
                assert await loop.run_in_executor(None, w1.stop) == 0  # unlinks: the block is retired
                w2 = WriterProc(
                    python_env, tmp_path, etcd_server.endpoint, prefix, shm_name, "--decoder", "json"
                )
                writers.append(w2)
                await loop.run_in_executor(None, w2.wait_published, start)
                await loop.run_in_executor(None, lambda: c.put(f"{prefix}/x", json.dumps(2)))
                return await asyncio.wait_for(waiter, 60)

            assert asyncio.run(main())
            assert r.get(f"{prefix}/x").decoded == 2
    finally:
        c.close()
