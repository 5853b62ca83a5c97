"""The per-slide skeleton every stage runs a slide through (``runtime/perslide.py``).

First the skeleton on its own, with real locks and a real ``status.csv``; then the contract
that ``tile``, ``embed`` and ``classify`` all go through it: the same unexpected error inside
each stage's work ends as the same one-line status row, and the batch goes on.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
from slide_factory import make_slide

from wsi_pipeline.errors import SlideError
from wsi_pipeline.runtime.locks import SlideLocks
from wsi_pipeline.runtime.perslide import SlideStep, worker_died
from wsi_pipeline.store.status import read_status

UNEXPECTED = "unexpected RuntimeError: boom (rerun with -v for details)"


@dataclasses.dataclass(frozen=True)
class Result:
    slide_id: str
    status: str
    reason: str = ""
    n_patches: int | None = None
    seconds: float = 0.0


def _step(out: Path, **kw: object) -> SlideStep:
    return SlideStep("tile", out, locks=SlideLocks(out, "tile"), **kw)  # type: ignore[arg-type]


def _run(step: SlideStep, work, **kw: object) -> Result:
    return step.run("s1", work, failed=lambda r: Result("s1", "failed", r),
                    skipped=lambda r: Result("s1", "skipped", r), **kw)  # type: ignore[arg-type]


def _rows(out: Path) -> list[dict[str, str]]:
    return read_status(out)


def test_ok_result_gets_seconds_one_status_row_and_the_lock_is_released(tmp_path: Path) -> None:
    step = _step(tmp_path)
    r = _run(step, lambda: Result("s1", "ok", "", 7))
    assert r.status == "ok" and r.seconds > 0
    (row,) = _rows(tmp_path)
    assert (row["slide_id"], row["stage"], row["status"], row["n_patches"]) == ("s1", "tile", "ok", "7")
    assert not step.locks.path("s1").exists()  # type: ignore[union-attr]


@pytest.mark.parametrize(("error", "reason"), [
    (SlideError("not a slide\nsecond line"), "not a slide"),
    (RuntimeError("boom\nsecond line"), UNEXPECTED),
])
def test_errors_become_one_failed_line_and_release_the_lock(tmp_path: Path, error: Exception, reason: str) -> None:
    step = _step(tmp_path)

    def work() -> Result:
        assert step.locks.path("s1").exists()  # type: ignore[union-attr]  # held during the work
        raise error

    r = _run(step, work)
    assert (r.status, r.reason) == ("failed", reason)
    assert [(x["status"], x["reason"]) for x in _rows(tmp_path)] == [("failed", reason)]
    assert not step.locks.path("s1").exists()  # type: ignore[union-attr]


def test_a_stage_explains_the_library_errors_it_knows(tmp_path: Path) -> None:
    step = _step(tmp_path, explain=lambda e: f"truncated ({e})" if isinstance(e, OSError) else None)
    assert _run(step, lambda: (_ for _ in ()).throw(OSError("eof"))).reason == "truncated (eof)"
    assert _run(step, lambda: (_ for _ in ()).throw(KeyError("x"))).reason.startswith("unexpected KeyError")


def test_a_slide_held_by_a_live_run_is_skipped_without_touching_its_temp_files(tmp_path: Path) -> None:
    final = tmp_path / "coords" / "s1.h5"
    final.parent.mkdir()
    temp = final.parent / ".s1.h5.abcd1234.tmp"  # the holder's file in progress
    temp.write_bytes(b"partial")
    held = SlideLocks(tmp_path, "tile").acquire("s1")  # this live process holds it
    try:
        r = _run(_step(tmp_path), lambda: pytest.fail("work ran without the lock"), outputs=[final])
    finally:
        held.release()
    assert r.status == "skipped" and r.reason.startswith("locked by")
    assert temp.exists()
    # without a holder the temp file is a dead run's and goes before the work starts
    r = _run(_step(tmp_path), lambda: Result("s1", "ok", "", 0, 0.0) if not temp.exists() else pytest.fail("kept"),
             outputs=[final])
    assert r.status == "ok"


def test_a_stage_without_locks_and_without_a_status_folder(tmp_path: Path) -> None:
    step = SlideStep("classify", None)
    r = step.run("s1", lambda: Result("s1", "ok"), failed=lambda x: Result("s1", "failed", x))
    assert r.status == "ok" and not list(tmp_path.iterdir())


def test_worker_death_is_a_failed_row_of_its_stage(tmp_path: Path) -> None:
    on_error = functools.partial(worker_died, "embed", str(tmp_path), lambda item, why: Result(item, "failed", why))
    r = on_error("s9", "Ray worker died: OOM")
    assert (r.slide_id, r.status, r.reason) == ("s9", "failed", "Ray worker died: OOM")
    assert [(x["slide_id"], x["stage"], x["status"]) for x in _rows(tmp_path)] == [("s9", "embed", "failed")]


# --------------------------------------------------------------------- every stage goes through it
@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("perslide") / "slides"
    d.mkdir()
    make_slide(d / "a.svs", 2048, 1536, mpp=0.5, seed=1)
    make_slide(d / "b.svs", 2048, 1536, mpp=0.5, seed=2)
    return d


STAGES = {
    # stage -> (module, a function its per-slide work calls)
    "tile": ("wsi_pipeline.tiling.stage", "_tile"),
    "embed": ("wsi_pipeline.embed.stage", "embed_coords"),
    "classify": ("wsi_pipeline.classify.scoring", "score_slide_sets"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_maps_an_unexpected_error_the_same_way(two_slides: Path, tmp_path: Path, stage: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from wsi_pipeline.classify.stage import classify_slides
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.embed.stage import EmbedConfig

    module_name, attr = STAGES[stage]
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = []

    def boom_on_first(*args, **kwargs):  # the first slide of the stage fails, the second goes on
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, boom_on_first)
    prompts = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
    summary = classify_slides([two_slides / "a.svs", two_slides / "b.svs"], tmp_path, prompts,
                              tiling=TilingConfig(patch_size=64, target_mpp=1.0),
                              embed=EmbedConfig(model="convlm_test"), visuals=False)
    rows = [r for r in read_status(tmp_path) if r["stage"] == stage]
    assert [(r["slide_id"], r["status"]) for r in rows] == [("a", "failed"), ("b", "ok")]
    assert rows[0]["reason"] in (UNEXPECTED, f"classify: {UNEXPECTED}")  # classify's rows name their stage
    by_id = {r.slide_id: r for r in summary.rows}
    assert by_id["a"].status == "failed" and UNEXPECTED in by_id["a"].reason
    assert by_id["b"].status == "ok"
