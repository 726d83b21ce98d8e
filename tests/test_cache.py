"""The stage store: atomic entries, locks, gc."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from sparselab.cache import StageCache


def test_entry_appears_only_when_complete(tmp_path):
    cache = StageCache(tmp_path)
    with cache.writing("prune", "abc", {"label": "x"}) as out:
        (out / "metrics.json").write_text('{"a": 1}')
        assert cache.entry("prune", "abc") is None  # not visible while being written
    entry = cache.entry("prune", "abc")
    assert entry.metrics == {"a": 1} and entry.meta["label"] == "x"
    assert not any((tmp_path / "tmp").iterdir())


def test_failed_stage_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.writing("prune", "abc", {}) as out:
            (out / "model.bin").write_bytes(b"0" * 1000)
            raise RuntimeError("boom")
    assert cache.entry("prune", "abc") is None
    assert cache.entries() == []
    assert not any((tmp_path / "tmp").iterdir())


def test_killed_stage_leaves_no_entry_and_gc_cleans(tmp_path):
    """SIGKILL mid-write: no entry appears; the orphaned temporary folder is removed by gc."""
    script = textwrap.dedent(f"""
        import time
        from sparselab.cache import StageCache
        cache = StageCache({str(tmp_path)!r})
        with cache.writing("prune", "abc", {{}}) as out:
            (out / "half.bin").write_bytes(b"0" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = StageCache(tmp_path)
    assert cache.entry("prune", "abc") is None
    leftovers = list((tmp_path / "tmp").iterdir())
    assert len(leftovers) == 1
    assert json.loads((leftovers[0] / "owner.json").read_text())["pid"] == proc.pid
    assert cache.gc(older_than_s=3600) == leftovers  # its writer on this host is gone
    assert not leftovers[0].exists()


def test_gc_never_touches_a_live_writers_folder(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(FileNotFoundError), cache.writing("prune", "abc", {}) as out:
        old = time.time() - 7200
        os.utime(out, (old, old))
        assert cache.gc(older_than_s=3600) == []  # old, but its writer (we) is alive
        (out / "owner.json").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        assert cache.gc(older_than_s=3600, dry_run=True) == [out]  # another host's: by age
        assert out.exists()  # a dry run removes nothing
        (out / "owner.json").write_text(json.dumps({"host": socket.gethostname(),
                                                    "pid": os.getpid(), "pid_start": "0"}))
        assert cache.gc(older_than_s=1e9) == [out]  # our pid, another start time: reused pid
    assert cache.entry("prune", "abc") is None  # the writer then fails: no entry from it


def test_lock_serialises_the_same_key(tmp_path):
    """A second runner waits on the key's lock, then finds the entry instead of recomputing."""
    script = textwrap.dedent(f"""
        import time
        from sparselab.cache import StageCache
        cache = StageCache({str(tmp_path)!r})
        with cache.lock("prune", "abc"):
            print("locked", flush=True)
            with cache.writing("prune", "abc", {{"by": "child"}}):
                time.sleep(1.5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    cache = StageCache(tmp_path)
    start = time.perf_counter()
    with cache.lock("prune", "abc"):
        waited = time.perf_counter() - start
        entry = cache.entry("prune", "abc")
    proc.wait()
    assert waited > 0.5
    assert entry is not None and entry.meta["by"] == "child"


def test_gc_keeps_only_listed_keys(tmp_path):
    cache = StageCache(tmp_path)
    for key in ("a", "b"):
        with cache.writing("load", key, {}):
            pass
    removed = cache.gc(keep={"a"})
    assert [e.key for e in cache.entries()] == ["a"]
    assert len(removed) == 1


def test_an_entry_missing_a_file_is_set_aside(tmp_path):
    cache = StageCache(tmp_path)
    with cache.writing("recover", "abc", {}) as out:
        (out / "steps.json").write_text("[]")
        (out / "metrics.json").write_text("{}")
    assert cache.entry("recover", "abc") is not None
    (tmp_path / "stages" / "recover" / "abc" / "steps.json").unlink()
    assert cache.entry("recover", "abc") is None  # counts as absent: it will be recomputed
    [aside] = (tmp_path / "damaged").iterdir()
    assert "steps.json is missing" in (aside / "damage.txt").read_text()
    assert not (tmp_path / "stages" / "recover" / "abc").exists()
