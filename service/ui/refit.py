"""The workbench's "refit" action: ``medaudit refine-cav`` in a child process, one at a time.

A refit re-extracts the bank's fit data through the model and refits every concept (seconds to
minutes): it cannot run inside a request. :func:`start` takes a Redis lock (one refit per
deployment, whichever replica the reviewer reached), starts ``python -m medaudit.cli refine-cav``
with the service's own environment (BENTOML_HOME, REDIS_URL, MEDAUDIT_FLAG_PREFIX: the same store
and the same reviewed flags) and returns at once; a thread waits for the process and records its
end. :func:`status` is what the page polls: state, the command's last output lines while it runs,
and, once done, its ``refine.json`` (held-out AUROC/AP of the stored bank, the refit without the
reviewed flags and the refined bank, per concept; the new version's name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from medaudit.service.errors import InvalidParameterError, RefitRunningError
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.review import _available, _text

#: A refit that has not ended after this long is taken for dead (its replica restarted).
LOCK_S = 3600
#: Output lines kept for the page.
TAIL_CHARS = 4000


def _job_key(keys: FlagKeys) -> str:
    return f"{keys.prefix}:ui:refit"


def status(client: redis.Redis, keys: FlagKeys) -> dict[str, Any]:
    """The last refit: ``{"state": "none" | "running" | "done" | "failed", …}``."""
    with _available():
        raw = client.hgetall(_job_key(keys))
    d = {_text(k): _text(v) for k, v in raw.items()}
    if not d:
        return {"state": "none"}
    out: dict[str, Any] = {k: v for k, v in d.items() if k not in ("report", "log_path")}
    if d.get("report"):
        out["report"] = json.loads(d["report"])
    if d.get("state") == "running" and d.get("log_path"):
        out["output"] = _tail(Path(d["log_path"]))
    return out


def start(
    client: redis.Redis,
    keys: FlagKeys,
    version: str,
    *,
    versions: list[str],
    model_name: str,
    reviewer: str,
    env: Mapping[str, str] | None = None,
    out_root: str | Path | None = None,
) -> dict[str, Any]:
    """Starts ``refine-cav VERSION`` unless a refit is running; returns :func:`status`.

    Raises:
        InvalidParameterError: A version this service does not serve (422).
        RefitRunningError: Another refit has not finished (409).
    """
    if version not in versions:
        raise InvalidParameterError(
            f"unknown version {version!r}; served: {', '.join(versions)}", valid=versions
        )
    job = uuid.uuid4().hex[:12]
    root = Path(out_root) if out_root else Path(tempfile.gettempdir()) / "medaudit-refits"
    out = root / job
    with _available():
        if not client.set(f"{_job_key(keys)}:lock", job, nx=True, ex=LOCK_S):
            raise RefitRunningError("a refit is already running; wait for it to finish")
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "refine.log"
        client.delete(_job_key(keys))
        client.hset(
            _job_key(keys),
            mapping={
                "job": job,
                "state": "running",
                "version": version,
                "reviewer": reviewer,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "log_path": str(log_path),
            },
        )
    cmd = [
        sys.executable,
        "-m",
        "medaudit.cli",
        "refine-cav",
        version,
        "--model-name",
        model_name,
        "--out",
        str(out),
    ]
    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**(env if env is not None else os.environ), "COLUMNS": "120", "NO_COLOR": "1"},
    )
    log.close()
    threading.Thread(
        target=_wait, args=(client, keys, job, proc, out), daemon=True, name=f"refit-{job}"
    ).start()
    return status(client, keys)


def _wait(client: redis.Redis, keys: FlagKeys, job: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    """Records the end of a refit: its exit status, output and report; then frees the lock."""
    rc = proc.wait()
    report = out / "refine.json"
    state = "done" if rc == 0 and report.exists() else "failed"
    try:
        client.hset(
            _job_key(keys),
            mapping={
                "state": state,
                "returncode": str(rc),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "output": _tail(out / "refine.log"),
                "report": report.read_text() if report.exists() else "",
            },
        )
        if _text(client.get(f"{_job_key(keys)}:lock") or b"") == job:
            client.delete(f"{_job_key(keys)}:lock")
    except (redis.ConnectionError, redis.TimeoutError):
        pass  # the lock expires by itself; the page then shows the job as running until LOCK_S


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-TAIL_CHARS:].decode("utf-8", "replace")
