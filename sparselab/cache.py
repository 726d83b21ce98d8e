"""Content-addressed stage store under $SPARSELAB_HOME (default .sparselab/).

An entry is `stages/<stage>/<key>/` holding `meta.json`, `metrics.json`, `artifacts/` and, for
stages that produce a model, `model/` (or `adapter/`). It is written into `tmp/` and renamed into
place only when complete, so a killed stage leaves no entry; a file lock per key keeps two runners
from computing the same key at once (the second waits, then finds the entry).

Entries are verified, not trusted: `files.json` records the size and sha256 of every file when the
entry is committed. Every read checks the sizes and the hashes of the small files (metadata,
metrics, per-example scores); the weights are hashed in full by `cache verify` and before a stage
is computed from them (`StageRunner`). An entry that fails is moved to `damaged/` (kept for a look,
never read again) and counts as absent, so it is recomputed; the log says so. Entries written
before checksums existed have no `files.json` and are read as they are.

Entries are also checked against the code asking for them (sparselab.provenance): an entry whose
meta names other code than the caller's `StageCode` is moved to `superseded/` and counts as
absent, so it is recomputed by the current code; the log says which files differ.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from sparselab.provenance import StageCode, difference, file_sha256

AFFECTS_RESULTS = False  # stores, never computes: sparselab.provenance leaves it out

log = logging.getLogger("sparselab")

MANIFEST = "files.json"
SMALL_FILE = 1 << 20  # files up to this size are hashed on every read


def sparselab_home() -> Path:
    return Path(os.environ.get("SPARSELAB_HOME", ".sparselab"))


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())

    @property
    def metrics(self) -> dict[str, float]:
        file = self.path / "metrics.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    @property
    def tags(self) -> dict[str, str]:
        file = self.path / "tags.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class StageCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else sparselab_home()

    def entry(self, stage: str, key: str, full: bool = False,
              code: StageCode | None = None) -> Entry | None:
        """The entry, or None when there is none, it is damaged, or (given `code`, the code now
        asking) it was made by other code; the last two are set aside.
        `full`: hash every file, weights included, not only the small ones."""
        path = self.root / "stages" / stage / key
        if not (path / "meta.json").is_file():
            return None
        entry = Entry(stage, key, path)
        problem = damage(path, full)
        if problem:
            self.set_aside(entry, problem)
            return None
        if code is not None and (made := made_by_other_code(entry, code)):
            self.set_aside(entry, made, "superseded")
            return None
        return entry

    def set_aside(self, entry: Entry, problem: str, why: str = "damaged") -> Path | None:
        """Move an entry that must not be served to damaged/ (or superseded/) with a note; it
        will be recomputed."""
        target = self.root / why / f"{entry.stage}-{entry.key}-{uuid.uuid4().hex[:8]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(entry.path, target)
        except OSError:  # another runner set it aside first
            return None
        (target / "damage.txt").write_text(problem + "\n")
        log.warning("cache entry %s/%s is %s (%s): set aside to %s; it will be recomputed",
                    entry.stage, entry.key, why, problem, target)
        return target

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{stage}-{key}.lock")):
            yield

    @contextmanager
    def writing(self, stage: str, key: str, meta: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder; on success it becomes the entry, on any exit it is removed."""
        tmp = self.root / "tmp" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        (tmp / "artifacts").mkdir(parents=True)
        (tmp / "owner.json").write_text(json.dumps(  # who computes it: `cache gc`, operators
            {**process_identity(), "started": time.time()}))
        try:
            yield tmp
            (tmp / "owner.json").unlink()
            (tmp / "meta.json").write_text(json.dumps(
                {**meta, "stage": stage, "key": key, "created": time.time(),
                 "host": socket.gethostname()}, indent=2, default=str))
            (tmp / MANIFEST).write_text(json.dumps(manifest(tmp), indent=1))
            final = self.root / "stages" / stage / key
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # computed by someone who did not hold our lock: keep theirs
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[Entry]:
        base = self.root / "stages"
        if not base.is_dir():
            return []
        return sorted((Entry(d.parent.name, d.name, d) for d in base.glob("*/*")
                       if (d / "meta.json").is_file()), key=lambda e: (e.stage, e.key))

    def gc(self, keep: set[str] | None = None, older_than_s: float = 3600.0,
           kinds: set[str] | None = None, dry_run: bool = False) -> list[Path]:
        """Remove abandoned temporary folders and, when `keep` is given, every entry of the
        stage `kinds` (all when None) whose key is not in it; entries of other kinds (a method's
        own analyses) stay. A temporary folder is abandoned when its writer on this host is gone,
        or, for a writer on another host (or none named), when it is older than `older_than_s`;
        a folder whose writer is alive is never touched. Returns what was (with `dry_run`: would
        be) removed."""
        doomed = []
        tmp = self.root / "tmp"
        if tmp.is_dir():
            now = time.time()
            for folder in tmp.iterdir():
                alive = owner_alive(_owner(folder))
                if alive is False or (alive is None and now - _mtime(folder) > older_than_s):
                    doomed.append(folder)
        if keep is not None:
            doomed += [entry.path for entry in self.entries()
                       if entry.key not in keep and (kinds is None or entry.stage in kinds)]
        if not dry_run:
            for folder in doomed:
                shutil.rmtree(folder, ignore_errors=True)
        return doomed


def made_by_other_code(entry: Entry, code: StageCode) -> str | None:
    """Why an entry was made by other code than `code`, or None when it was made by this code."""
    try:
        recorded = entry.meta.get("code")
    except (OSError, ValueError) as exc:
        return f"its meta.json is unreadable ({exc})"
    if isinstance(recorded, dict) and recorded.get("lineage") == code.lineage:
        return None
    return "made by other code: " + difference(recorded, code)


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """relative path -> size and sha256 of every file of an entry folder (but the manifest)."""
    return {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}


def damage(folder: Path, full: bool = False) -> str | None:
    """What is wrong with an entry folder against its manifest, or None: a missing or resized
    file always, a changed hash of a small file always and of any file with `full`."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None  # an entry from before checksums: read as it is
    except (OSError, ValueError) as exc:
        return f"its {MANIFEST} is unreadable ({exc})"
    for name, expected in recorded.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written"
        if (full or size <= SMALL_FILE) and file_sha256(path) != expected["sha256"]:
            return f"{name} has changed since it was written (sha256)"
    return None


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """host, pid and the process's start time (so a reused pid is not mistaken for it)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid)}


def _process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """Whether the process an owner record names still runs: None when that cannot be known
    here (another host, no record)."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    try:
        pid = int(owner["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return None
    recorded = owner.get("pid_start")
    return recorded is None or recorded == _process_start(pid)  # else: the pid was reused


def _owner(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "owner.json").read_text())
    except (OSError, ValueError):
        return None


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0
