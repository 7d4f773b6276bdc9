"""Issue 16's reproduction, end to end: another uid squats a snapshot's control segment.

Needs root, a ``nobody`` user, a ``nogroup`` group and ``setpriv``. A ``nobody``
process creates ``/dev/shm/shmks.<name>`` (0666) and holds it open for writing;
then the real CLI runs as root: the writer must refuse with one line naming the
segment, its owner and mode; a reader must refuse the squatted segment;
``shmkeyspace unlink`` removes it. Prints each command, its exit code and output.

    PYTHONPATH=. ./run bench --only security_repro
"""

from __future__ import annotations

import subprocess
import sys
import uuid

from shmkeyspace.embedded import EtcdServer

CLI = [sys.executable, "-m", "shmkeyspace"]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def sh(cmd: list) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print("$", " ".join(cmd), f"\n  exit {r.returncode}", r.stdout.strip(), r.stderr.strip())
    return r


def main(argv=None) -> int:
    name = f"sq{uuid.uuid4().hex[:6]}"
    path = f"/dev/shm/shmks.{name}"
    squat = f"truncate -s 4096 {path}; chmod 666 {path}; exec 3<>{path}; echo ready; exec sleep 600"
    with EtcdServer() as srv:
        squatter = subprocess.Popen([*AS_NOBODY, "sh", "-c", squat], stdout=subprocess.PIPE, text=True)
        try:
            print(squatter.stdout.readline().strip() if squatter.stdout else "")
            sh(["ls", "-l", path])
            w = sh([*CLI, "writer", "--endpoints", srv.endpoint, "--prefix", f"/{name}", "--name", name])
            sh(["ls", "-l", path])
            g = sh([*CLI, "get", name, f"/{name}/a"])
        finally:
            squatter.kill()
            squatter.wait()
        sh([*CLI, "unlink", name])
    refused = w.returncode == 1 and "owned by uid" in w.stderr and g.returncode == 1
    print("writer and reader refused the squatted segment" if refused else "NOT REFUSED")
    return 0 if refused else 1


if __name__ == "__main__":
    sys.exit(main())
