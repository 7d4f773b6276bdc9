"""Consistent reads: ``Reader.sync()`` / ``aio.sync`` against a real etcd and real writers.

After ``sync()`` returns, a reader's next query reflects every change committed
under the prefix before the call (puts, deletes, from any client), with the
writer's apply delay long enough that a plain read right after the write would
see the old value. Errors name their cause: no writer, etcd gone, a socket
owned by someone else.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from shmkeyspace import Reader, SyncError, Writer, aio, consistent
from shmkeyspace.errors import UntrustedSegmentError
from shmkeyspace.reader import IMPLEMENTATIONS


def test_sync_makes_the_next_query_see_every_write_before_it(etcd_server, client, prefix, shm_name):
    # 0.3 s of apply delay: without sync, a read right after a put would see the old value.
    with Writer(shm_name, prefix, endpoints=etcd_server.endpoint, apply_delay=0.3) as w:
        w.start()
        readers = [Reader(shm_name, implementation=impl, cache_size=16) for impl in IMPLEMENTATIONS]
        try:
            stale_seen = 0
            for i in range(12):
                key = f"{prefix}/k{i % 3}"
                if i % 4 == 3:
                    client.delete(key)
                    want = None
                else:
                    client.put(key, f"v{i}")
                    want = f"v{i}".encode()
                r = readers[i % len(readers)]
                got = r.get(key)
                stale_seen += (None if got is None else got.decoded) != want
                now = r.sync(timeout=30)
                got = r.get(key)
                assert (None if got is None else got.decoded) == want, (i, r.implementation)
                assert now >= r.revision
            # An unrelated write outside the prefix: sync still returns (progress), at or past it.
            other = client.put(f"{prefix}-elsewhere", "x").header.revision
            assert readers[0].sync(timeout=30) >= other
            assert stale_seen > 0  # the apply delay was real: reads without sync lag
            assert w.sync_server is not None and w.sync_server.rounds >= 13
        finally:
            for r in readers:
                r.close()


def test_concurrent_syncs_share_rounds_and_aio_sync_awaits(etcd_server, client, prefix, shm_name):
    with Writer(shm_name, prefix, endpoints=etcd_server.endpoint, apply_delay=0.05) as w:
        w.start()
        client.put(f"{prefix}/a", "1")
        errors = []
        revs = []

        def one():
            try:
                with Reader(shm_name) as r:
                    revs.append(r.sync(timeout=30))
                    assert r.get(f"{prefix}/a").decoded == b"1"
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(revs) == 16
        assert w.sync_server.served >= 16 and w.sync_server.rounds <= 16

        async def main():
            with Reader(shm_name) as r:
                client.put(f"{prefix}/b", "2")
                rev = await aio.sync(r, timeout=30)
                assert r.get(f"{prefix}/b").decoded == b"2"
                return rev

        assert asyncio.run(main()) >= max(revs)


def test_sync_errors_name_their_cause(own_etcd, prefix, shm_name, tmp_path):
    w = Writer(shm_name, prefix, endpoints=own_etcd.endpoint, apply_delay=0.01, stale_after=2.0)
    w.start()
    r = Reader(shm_name)
    try:
        assert r.sync(timeout=30) > 0
        own_etcd.stop()
        with pytest.raises(SyncError, match="etcd did not answer|did not get current"):
            r.sync(timeout=60)
    finally:
        w.stop()
    # The writer is gone: its socket with it.
    assert not os.path.exists(consistent.socket_path(shm_name))
    with pytest.raises(SyncError, match="no writer answers sync requests"):
        r.sync(timeout=5)
    r.close()


def test_a_socket_not_owned_by_the_snapshot_writer_is_not_asked(etcd_server, prefix, shm_name):
    with Writer(shm_name, prefix, endpoints=etcd_server.endpoint, apply_delay=0.01) as w:
        w.start()
        with Reader(shm_name) as r:
            with pytest.raises(UntrustedSegmentError, match="not to the snapshot's writer"):
                consistent.request(shm_name, r.owner_uid + 1, 5)
