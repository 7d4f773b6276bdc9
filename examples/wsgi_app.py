"""A small WSGI service that answers from the shmkeyspace mirror (no etcd calls).

Endpoints (all answer JSON, and every answer names the worker ``pid``):

    GET /get?key=K              one key: value, revisions; 404 if missing
    GET /prefixed?prefix=P      keys under P (``&limit=N``, default 100)
    GET /health                 snapshot revision, key count, writer state and lag

Run it under gunicorn with the ready-made config (it starts the writer)::

    SHMKEYSPACE_NAME=demo SHMKEYSPACE_PREFIX=/demo SHMKEYSPACE_ENDPOINTS=127.0.0.1:2379 \\
    SHMKEYSPACE_DECODER=json gunicorn -c workers/gunicorn.conf.py --pythonpath examples wsgi_app:application

Values are what the writer's decoder produced; bytes (the ``raw`` decoder) are
returned as text when they are UTF-8, else as ``{"base64": ...}``.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Callable, Dict, Iterable, List, Tuple
from urllib.parse import parse_qs

from shmkeyspace.errors import ShmKeyspaceError, SnapshotExpiredError
from shmkeyspace.gunicorn import reader


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _entry(e: Any) -> Dict[str, Any]:
    return {
        "key": _jsonable(e.key),
        "value": _jsonable(e.decoded),
        "create_revision": e.create_revision,
        "mod_revision": e.mod_revision,
        "version": e.version,
        "lease": e.lease,
    }


def _consistent(fn: Callable[[Any], Dict[str, Any]]) -> Dict[str, Any]:
    """Run ``fn(view)`` on one snapshot, so the revision matches the data it returns."""
    for _ in range(3):
        try:
            with reader().snapshot() as view:
                out = fn(view)
                out["revision"] = view.revision
                return out
        except SnapshotExpiredError:  # the writer published twice meanwhile: read again
            continue
    with reader().snapshot(copy=True) as view:
        out = fn(view)
        out["revision"] = view.revision
        return out


def get(q: Dict[str, List[str]]) -> Tuple[int, Dict[str, Any]]:
    key = q.get("key", [""])[0]
    if not key:
        return 400, {"error": "missing ?key="}

    def lookup(view: Any) -> Dict[str, Any]:
        e = view.get(key)
        return {"key": key, "found": False} if e is None else {"found": True, **_entry(e)}

    out = _consistent(lookup)
    return (200 if out["found"] else 404), out


def prefixed(q: Dict[str, List[str]]) -> Tuple[int, Dict[str, Any]]:
    prefix = q.get("prefix", [""])[0]
    try:
        limit = int(q.get("limit", ["100"])[0])
    except ValueError:
        return 400, {"error": "limit must be an integer"}

    def scan(view: Any) -> Dict[str, Any]:
        entries = view.prefixed(prefix)
        return {"prefix": prefix, "count": len(entries), "entries": [_entry(e) for e in entries[:limit]]}

    return 200, _consistent(scan)


def health(q: Dict[str, List[str]]) -> Tuple[int, Dict[str, Any]]:
    h = reader().health()
    return 200, {
        # stale: serving the last snapshot, from a dead writer or one out of touch with etcd
        "status": "stale" if h.stale else "ok",
        "stale": h.stale,
        "etcd_contact_age": h.etcd_contact_age,
        "revision": h.revision,
        "keys": h.keys,
        "writer_alive": h.writer_alive,
        "writer_pid": h.writer_pid,
        "heartbeat_age": h.heartbeat_age,
        "etcd_revision": h.etcd_revision,
        "lag": h.lag,
        "generation": h.generation,
        "published_at": h.published_at,
    }


ROUTES = {"/get": get, "/prefixed": prefixed, "/health": health}


def application(environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
    route = ROUTES.get(environ.get("PATH_INFO", "/"))
    if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
        status, body = 405, {"error": "GET only"}
    elif route is None:
        status, body = 404, {"error": "unknown path", "paths": sorted(ROUTES)}
    else:
        try:
            status, body = route(parse_qs(environ.get("QUERY_STRING", "")))
        except ShmKeyspaceError as exc:  # no snapshot yet, or an unusable one
            status, body = 503, {"error": f"{type(exc).__name__}: {exc}"}
    body["pid"] = os.getpid()
    data = json.dumps(body).encode()
    reason = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        503: "Service Unavailable",
    }[status]
    start_response(
        f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
