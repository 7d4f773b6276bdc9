"""Ready-to-use gunicorn config: the master runs the shmkeyspace writer, workers read it.

    SHMKEYSPACE_NAME=services SHMKEYSPACE_PREFIX=/services SHMKEYSPACE_ENDPOINTS=10.0.0.1:2379 \
    SHMKEYSPACE_DECODER=json gunicorn -c workers/gunicorn.conf.py myapp:application

Settings come from the environment (see shmkeyspace.gunicorn for all of them):
SHMKEYSPACE_NAME, SHMKEYSPACE_PREFIX, SHMKEYSPACE_ENDPOINTS, SHMKEYSPACE_DECODER,
SHMKEYSPACE_EXTERNAL_WRITER=1 (a systemd unit or sidecar runs the writer instead),
SHMKEYSPACE_APPLY_DELAY, SHMKEYSPACE_WRITER_ARGS; and for gunicorn itself
GUNICORN_BIND (default 127.0.0.1:8000) and GUNICORN_WORKERS (default 2 x cores + 1).
Command-line flags (--bind, --workers, ...) override this file as usual.
To keep your own config, copy the import line below into it.
"""

import multiprocessing
import os

from shmkeyspace.gunicorn import *  # noqa: F401,F403  on_starting, post_fork, worker_exit, on_exit

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count() * 2 + 1))
# Each worker maps the snapshot read-only; nothing is gained by loading the app in the
# master, and not preloading keeps the master free of app state across forks.
preload_app = False
