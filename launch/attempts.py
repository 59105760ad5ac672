"""OUT/launch/attempts.jsonl: a start and an end record for every attempt of every rank.

Appends are serialised with a file lock (ranks and array tasks share the file), so a requeued job
can number its attempt by counting the earlier starts of the same job name and rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

ATTEMPTS_FILENAME = "attempts.jsonl"
STDERR_TAIL_LINES = 40


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[BinaryIO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_attempts(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every start/end record under OUT/launch/attempts.jsonl, in order (torn lines skipped)."""
    path = Path(out_dir) / "launch" / ATTEMPTS_FILENAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def start_attempt(out_dir: Path, name: str, place: Any, command: str) -> dict[str, Any]:
    """Append a start record; its attempt number counts earlier starts of this job name and rank."""
    path = out_dir / "launch" / ATTEMPTS_FILENAME
    with _locked(path) as f:
        f.seek(0)
        previous = 0
        for line in f.read().decode(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                previous += (
                    rec.get("event") == "start"
                    and rec.get("name") == name
                    and rec.get("rank") == place.rank
                )
        attempt = previous + 1
        log_dir = out_dir / "launch" / name / f"attempt-{attempt:02d}-job-{place.job_id}"
        record = {
            "event": "start",
            "name": name,
            "attempt": attempt,
            "job_id": place.job_id,
            "restart_count": place.restart_count,
            "rank": place.rank,
            "world_size": place.world_size,
            "cluster": place.cluster,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "command": command,
            "log_dir": str(log_dir),
        }
        f.seek(0, os.SEEK_END)
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
    log_dir.mkdir(parents=True, exist_ok=True)
    return record


def end_attempt(out_dir: Path, start: dict[str, Any], status: str, **extra: Any) -> None:
    record = {
        "event": "end",
        "name": start["name"],
        "attempt": start["attempt"],
        "job_id": start["job_id"],
        "rank": start["rank"],
        "status": status,
        "time": time.time(),
        "elapsed_s": round(time.time() - start["time"], 3),
        **extra,
    }
    with _locked(out_dir / "launch" / ATTEMPTS_FILENAME) as f:
        f.write((json.dumps(record) + "\n").encode())
        f.flush()


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    """The last `lines` lines of a log (tqdm's carriage-return updates collapsed)."""
    if not path.is_file():
        return f"(no stderr file at {path})"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode(errors="replace")
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(kept[-lines:]) or "(stderr was empty)"
