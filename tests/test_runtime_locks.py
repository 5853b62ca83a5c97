"""Per-slide lock files: contents, live vs stale holders, races between processes, stage integration."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slide_factory import make_slide

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.errors import ConfigError, SlideLockedError
from wsi_pipeline.runtime.locks import (
    LockInfo,
    SlideLocks,
    parse_duration,
    pid_alive,
    remove_temps_of,
)
from wsi_pipeline.store.atomic import atomic_path
from wsi_pipeline.store.status import latest_status
from wsi_pipeline.tiling.stage import tile_slides

TILING = TilingConfig(patch_size=64, target_mpp=1.0, min_tissue_area=2000.0)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


def _write_lock(path: Path, *, pid: int, host: str, age_s: float = 0.0, pid_start: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host, "started": time.time() - age_s, "stage": "tile", "slide_id": path.stem,
            "token": "t" * 32, "pid_start": pid_start}
    path.write_text(json.dumps(info))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def test_lock_file_holds_owner_and_blocks_a_second_run(tmp_path: Path) -> None:
    locks = SlideLocks(tmp_path, "tile")
    lock = locks.acquire("s1")
    path = tmp_path / "locks" / "tile" / "s1.lock"
    assert lock.path == path and path.is_file()
    doc = json.loads(path.read_text())
    assert doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()
    assert doc["stage"] == "tile" and doc["slide_id"] == "s1" and abs(doc["started"] - time.time()) < 60
    with pytest.raises(SlideLockedError, match=rf"^locked by {socket.gethostname()}:{os.getpid()} since ") as e:
        SlideLocks(tmp_path, "tile").acquire("s1")
    assert isinstance(e.value.holder, LockInfo) and e.value.holder.token == doc["token"]
    lock.release()
    assert not path.exists()
    with SlideLocks(tmp_path, "tile").acquire("s1"):  # free again
        assert path.exists()
    assert not path.exists()


def test_scopes_are_separate_folders(tmp_path: Path) -> None:
    with SlideLocks(tmp_path, "embed", scope="model-a").acquire("s"):
        with SlideLocks(tmp_path, "embed", scope="model-b").acquire("s") as other:
            assert other.path == tmp_path / "locks" / "embed" / "model-b" / "s.lock"


def test_dead_pid_on_this_host_is_stale_and_cleared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    locks = SlideLocks(tmp_path, "tile")
    dead = _dead_pid()
    _write_lock(locks.path("s1"), pid=dead, host=socket.gethostname())
    with caplog.at_level(logging.INFO, logger="wsi_pipeline.runtime.locks"):
        lock = locks.acquire("s1")
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    [msg] = [r.getMessage() for r in caplog.records if "cleared stale" in r.getMessage()]
    assert f"held by {socket.gethostname()}:{dead}" in msg and f"process {dead} on this host is gone" in msg


def test_live_pid_and_other_hosts_are_respected_until_the_timeout(tmp_path: Path) -> None:
    locks = SlideLocks(tmp_path, "tile", timeout_s=3600)
    _write_lock(locks.path("live"), pid=os.getppid(), host=socket.gethostname(), age_s=600)
    _write_lock(locks.path("remote"), pid=_dead_pid(), host="other-node-17", age_s=600)  # pid means nothing here
    _write_lock(locks.path("old"), pid=os.getppid(), host="other-node-17", age_s=7200)
    for sid, owner in (("live", f"{socket.gethostname()}:{os.getppid()}"), ("remote", "other-node-17:")):
        with pytest.raises(SlideLockedError, match=f"locked by {owner}"):
            locks.acquire(sid)
    assert locks.acquire("old").info.pid == os.getpid()  # 2 h > 1 h timeout: stale whatever the host
    assert locks.clear_stale() == 0 and locks.path("live").exists() and locks.path("remote").exists()


def test_reused_pid_and_unreadable_files(tmp_path: Path) -> None:
    locks = SlideLocks(tmp_path, "tile")
    _write_lock(locks.path("reused"), pid=os.getpid(), host=socket.gethostname(), pid_start="1")  # not our start
    assert locks.acquire("reused").info.pid_start != "1"
    locks.path("fresh").write_bytes(b"")  # a run is between create and write
    with pytest.raises(SlideLockedError, match="locked by a run that is writing its lock"):
        locks.acquire("fresh")
    locks.path("garbled").write_bytes(b"{not json")
    t = time.time() - 120
    os.utime(locks.path("garbled"), (t, t))
    assert locks.clear_stale() == 1 and not locks.path("garbled").exists()


def test_release_never_removes_a_lock_taken_over_by_another_run(tmp_path: Path) -> None:
    locks = SlideLocks(tmp_path, "tile")
    lock = locks.acquire("s")
    _write_lock(lock.path, pid=os.getppid(), host=socket.gethostname())  # a run that judged ours stale
    lock.release()
    assert json.loads(lock.path.read_text())["pid"] == os.getppid()


def _contend(folder: str, ids: list[str], result: str, barrier: mp.synchronize.Barrier) -> None:
    locks = SlideLocks(folder, "tile")
    barrier.wait()
    got = []
    for sid in ids:
        try:
            locks.acquire(sid)  # never released: each id must be won exactly once
            got.append(sid)
        except SlideLockedError:
            pass
    Path(result).write_text("\n".join(got))
    barrier.wait()  # stay alive until every racer is done: a dead holder's locks are stale


@pytest.mark.parametrize("stale_first", [False, True], ids=["free", "stale"])
def test_racing_processes_each_win_a_slide_exactly_once(tmp_path: Path, stale_first: bool) -> None:
    ids = [f"s{i:03d}" for i in range(60)]
    if stale_first:  # every slide has a dead run's lock: all racers try to break it at once
        dead = _dead_pid()
        for sid in ids:
            _write_lock(SlideLocks(tmp_path, "tile").path(sid), pid=dead, host=socket.gethostname())
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), ids[::step], str(tmp_path / f"r{k}"), barrier))
             for k, step in enumerate((1, -1, 1, -1))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    won = [s for k in range(4) for s in (tmp_path / f"r{k}").read_text().split()]
    assert sorted(won) == ids  # every slide once, none twice


def test_parse_duration() -> None:
    assert [parse_duration(x) for x in ("6h", "90m", "3600s", "1d", "2", "0.5h")] == [21600, 5400, 3600, 86400, 7200,
                                                                                      1800]
    for bad in ("", "soon", "-1h", "0"):
        with pytest.raises(ConfigError, match="--lock-timeout"):
            parse_duration(bad)


def test_remove_temps_of_removes_only_that_outputs_temps(tmp_path: Path) -> None:
    final = tmp_path / "a.h5"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:  # a real temp name, then "crash" mid-write
        tmp.write_bytes(b"x")
        kept = tmp.with_name(tmp.name + ".keep")
        shutil.copy(tmp, kept)
        raise RuntimeError
    leftover = kept.rename(tmp)  # as a SIGKILL would have left it
    others = [tmp_path / ".a.h5.x.tmp", tmp_path / ".ab.h5.abcdefgh.tmp", tmp_path / ".a.h5.abcdefgh.tmp.keep"]
    for p in others:
        p.write_bytes(b"y")
    zarr_tmp = tmp_path / ".a.0123abcd.tmp"
    (zarr_tmp / "features").mkdir(parents=True)
    assert remove_temps_of(final) == 1 and not leftover.exists()
    assert all(p.exists() for p in others)
    assert remove_temps_of(tmp_path / "a") == 1 and not zarr_tmp.exists()


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SlideLocks(tmp_path, "tile", timeout_s=0)


# -- stage integration ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("lock_slides")
    return [make_slide(d / f"{n}.svs", 1024, 768, mpp=0.5, seed=s).path for n, s in (("a", 1), ("b", 3))]


def test_tile_skips_a_slide_held_by_a_live_run_and_takes_it_once_stale(two_slides: list[Path], tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "locks" / "tile" / "b.lock", pid=holder.pid, host=socket.gethostname())
        results = tile_slides(two_slides, tmp_path, TILING)
        assert [r.status for r in results] == ["ok", "skipped"]
        assert results[1].reason.startswith(f"locked by {socket.gethostname()}:{holder.pid} since ")
        assert not (tmp_path / "coords" / "b.h5").exists()
        row = latest_status(tmp_path, "tile")["b"]
        assert row["status"] == "skipped" and row["reason"] == results[1].reason
    finally:
        holder.kill()
        holder.wait()
    again = tile_slides(two_slides, tmp_path, TILING)  # the holder is gone: its lock is stale
    assert [r.status for r in again] == ["skipped", "ok"] and again[0].reason == "outputs exist and validate"
    assert (tmp_path / "coords" / "b.h5").is_file()
    assert not list((tmp_path / "locks" / "tile").glob("*.lock"))


def test_two_concurrent_tile_runs_do_each_slide_once(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        make_slide(slides / f"c{i}.svs", 1536, 1024, mpp=0.5, seed=10 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", "-q", "tile", str(slides), "-o", str(out), "--patch-size", "64",
           "--target-mpp", "1.0", "--min-tissue-area", "2000"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    import csv

    with open(out / "status.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for i in range(4):
        mine = [r for r in rows if r["slide_id"] == f"c{i}"]
        assert [r["status"] for r in mine].count("ok") == 1, mine  # tiled by exactly one run
        other = next(r for r in mine if r["status"] != "ok")
        assert other["status"] == "skipped" and other["reason"].startswith(("locked by", "outputs exist")), other
    from wsi_pipeline.store.coords import validate_coords

    assert all(validate_coords(out / "coords" / f"c{i}.h5", {}) is True for i in range(4))
    assert not list(out.rglob("*.tmp")) and not list((out / "locks").rglob("*.lock"))


def test_embed_and_classify_respect_a_live_lock(two_slides: list[Path], tmp_path: Path) -> None:
    from wsi_pipeline.classify.stage import classify_slides
    from wsi_pipeline.embed.stage import EmbedConfig, embed_slides

    prompts = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
    cfg = EmbedConfig(workers=0)
    tile_slides(two_slides, tmp_path, TILING)
    model_id = embed_slides(tmp_path, cfg, slide_ids=["a"]).model_id
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "locks" / "embed" / model_id / "b.lock", pid=holder.pid, host=socket.gethostname())
        summary = embed_slides(tmp_path, cfg)
        assert [(r.slide_id, r.status) for r in summary.results] == [("a", "skipped"), ("b", "skipped")]
        assert summary.results[1].reason.startswith(f"locked by {socket.gethostname()}:{holder.pid}")
        assert not (tmp_path / "features" / model_id / "b.h5").exists()
        result = classify_slides(None, tmp_path, prompts, tiling=TILING, embed=cfg, visuals=False)
        rows = {r.slide_id: r for r in result.rows}
        assert rows["a"].status == "ok"
        assert rows["b"].status == "failed" and rows["b"].reason.startswith("embed: locked by")
    finally:
        holder.kill()
        holder.wait()
    again = embed_slides(tmp_path, cfg)
    assert [r.status for r in again.results] == ["skipped", "ok"]
