"""Which code made a cache entry, so a stage computed by other code is never served as this code's.

A stage's key names its configuration; its *code* is the source its computation runs: the
modules its kind, method, datasets and tasks live in and every sparselab module those import
(anywhere in the file: sparselab imports lazily inside functions), found from the source's
import statements without importing anything. A module that plans, reports or records but never
changes what a stage writes says so with a top-level `AFFECTS_RESULTS = False`; it and what only
it imports are left out (editing the report does not retire the cache). `StageCode.source` hashes those files' contents,
so an edit without a version bump changes it, and an edit elsewhere (the report, the CLI) does
not. `StageCode.lineage` chains it with the parent stage's, so a prune recomputed by new code
also retires the evaluations and recoveries made from the old one. Each entry's meta records
the code that made it (package version, git commit, dirty flag, source hash and the hash of
each file); the stage runner recomputes an entry whose lineage is not the current one
(sparselab.runner), and a run's tags name each stage's code as it was computed.

A local model folder or file is named by its content (`content_fingerprint`): the hashes of
its files, recomputed only when a file's size or modification time changed.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "sparselab"
PACKAGE_DIR = Path(__file__).resolve().parent


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def module_file(name: str) -> Path | None:
    """The source file of a module: sparselab's found on disk without importing it; another
    (a test registering a toy method) from its loaded module or its spec."""
    if _ours(name):
        base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    import importlib.util
    import sys
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return Path(origin) if origin and origin.endswith(".py") else None


@lru_cache(maxsize=None)
def _file_text(path: Path) -> bytes:
    return path.read_bytes()


@lru_cache(maxsize=None)
def imported_modules(name: str) -> frozenset[str]:
    """The sparselab modules a module's source imports, at any depth of the file."""
    path = module_file(name)
    if path is None:
        return frozenset()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(_file_text(path), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, `level - 1` steps up
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if _ours(base):  # `from a import b`: b is a module of a's, or a name defined in a
                found.update(f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}")
                             else base for alias in node.names)
    return frozenset(m for m in found if _ours(m) and module_file(m))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


@lru_cache(maxsize=None)
def affects_results(name: str) -> bool:
    """False where the module declares `AFFECTS_RESULTS = False` at its top level."""
    path = module_file(name)
    for node in ast.parse(_file_text(path), str(path)).body if path else ():
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "AFFECTS_RESULTS" for t in node.targets):
            return not (isinstance(node.value, ast.Constant) and node.value.value is False)
    return True


def closure(roots: Iterable[str]) -> list[str]:
    """The roots and every sparselab module they import that affects results, transitively,
    sorted."""
    seen: set[str] = set()
    todo = [root for root in roots if module_file(root) is not None]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(m for m in imported_modules(name) - seen if affects_results(m))
    return sorted(seen)


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PACKAGE_DIR.parent))
    except ValueError:
        return str(path)


@lru_cache(maxsize=None)
def source_files(roots: tuple[str, ...]) -> dict[str, str]:
    """file (relative to the package's folder) -> sha256 of its content, for a root set."""
    files = {}
    for name in closure(roots):
        path = module_file(name)
        files[_shown_path(path)] = _digest(_file_text(path))
    return dict(sorted(files.items()))


@lru_cache(maxsize=1)
def repository() -> dict[str, Any]:
    """sparselab's version, and the git commit and dirty flag of the tree it runs from (None
    where it is not a git checkout: an installed wheel)."""
    facts: dict[str, Any] = {"version": None, "commit": None, "dirty": None}
    try:
        facts["version"] = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        pass
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=PACKAGE_DIR, check=True).stdout.strip()
        facts["commit"] = git("rev-parse", "HEAD")
        facts["dirty"] = bool(git("status", "--porcelain", "--", str(PACKAGE_DIR)))
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


@dataclass(frozen=True)
class StageCode:
    """The code of one stage: its source hash and files, and the lineage hash that chains it
    with its parent stage's (what an entry must match to be served)."""
    source: str
    lineage: str
    files: dict[str, str]

    @classmethod
    def of(cls, roots: Iterable[str], parent_lineage: str | None) -> StageCode:
        files = source_files(tuple(sorted(set(roots))))
        source = _digest(json.dumps(files, sort_keys=True).encode())
        return cls(source, _digest(json.dumps([source, parent_lineage]).encode()), files)

    def record(self) -> dict[str, Any]:
        """What an entry's meta keeps: the repository facts beside the hashes."""
        return {**repository(), "source": self.source, "lineage": self.lineage,
                "files": self.files}


def describe(code: dict[str, Any] | None) -> str:
    """One line naming the code an entry records (a run tag, a log line)."""
    if not code:
        return "unrecorded (made before entries named their code)"
    commit = (code.get("commit") or "no git")[:12]
    dirty = " + uncommitted changes" if code.get("dirty") else ""
    return f"sparselab {code.get('version')} {commit}{dirty}, source {code['source'][:12]}"


def difference(recorded: dict[str, Any] | None, current: StageCode) -> str:
    """Why an entry's code is not the current code, in words."""
    if not recorded or "lineage" not in recorded:
        return "it records no code identity (made by an older sparselab)"
    if recorded.get("source") == current.source:
        return "the stage it was computed from was made by other code"
    before = recorded.get("files", {})
    changed = sorted(f for f in set(before) | set(current.files)
                     if before.get(f) != current.files.get(f))
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"its code differs in {shown}" if changed else "its source hash differs"


# --- local models by content -------------------------------------------------------------------

def content_fingerprint(path: Path, memo_file: Path | None = None) -> str:
    """A hash of a local model folder's (or file's) content: every file's sha256, computed again
    only for files whose size or modification time changed since `memo_file` last saw them."""
    path = path.expanduser().resolve()
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(path).parts))
    memo: dict[str, list[Any]] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    hashes, changed = {}, False
    for file in files:
        stat = file.stat()
        seen = memo.get(str(file))
        if not (seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns):
            seen = memo[str(file)] = [stat.st_size, stat.st_mtime_ns, file_sha256(file)]
            changed = True
        hashes[file.name if file == path else str(file.relative_to(path))] = seen[2]
    if changed and memo_file is not None:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return _digest(json.dumps(hashes, sort_keys=True).encode())
