"""``--shard i/n``: a deterministic split by slide id that covers every slide exactly once."""

from __future__ import annotations

import hashlib
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from slide_factory import make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig, embed_slides
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.runtime import RuntimeConfig
from wsi_pipeline.runtime.shard import Shard, parse_shard, shard_index
from wsi_pipeline.store.status import read_status
from wsi_pipeline.tiling.stage import tile_slides


def _reference_shard(slide_id: str, n: int) -> int:
    digest = hashlib.sha1(unicodedata.normalize("NFC", slide_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def test_shard_index_is_sha1_of_the_id() -> None:
    ids = ["TCGA-A1-A0SB-01Z-00-DX1", "slide 1", "ä-slide", "x" * 200, "0", ""]
    for n in (1, 2, 3, 8, 1000):
        assert [shard_index(s, n) for s in ids] == [_reference_shard(s, n) for s in ids]
    # golden values: a change of the split would silently reshuffle running Slurm arrays
    assert [shard_index(s, 4) for s in ("a", "b", "c", "d", "e")] == [0, 1, 3, 2, 0]
    assert shard_index(unicodedata.normalize("NFD", "ä-slide"), 7) == shard_index("ä-slide", 7)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16])
def test_n_shards_cover_every_slide_exactly_once(n: int) -> None:
    rng = np.random.default_rng(n)
    ids = [f"slide-{int(v)}" for v in rng.integers(0, 10**9, size=300)] + ["späce ü", "a/b"]
    parts = [Shard(i, n).select(ids) for i in range(n)]
    assert sorted(s for p in parts for s in p) == sorted(ids)
    assert all(p == [s for s in ids if s in set(p)] for p in parts)  # input order kept
    if n > 1:
        assert all(0 < len(p) < len(ids) for p in parts)  # a hash spreads them


@pytest.mark.parametrize("text", ["2/2", "3/2", "a/b", "1", "-1/3", "0/0", "1/2/3"])
def test_bad_shard_is_a_usage_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_parse_shard() -> None:
    assert parse_shard(None) is None and parse_shard("") is None
    s = parse_shard(" 3 / 8 ")
    assert s == Shard(3, 8) and str(s) == "3/8" and s.tag == "shard-3-of-8"


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shard_slides")
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)):
        make_slide(d / f"{name}.svs", 768, 512, mpp=0.5, seed=seed)
    return d


def test_cli_shards_tile_disjoint_sets_that_cover_the_batch(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["tile", str(slides), "-o", str(out), "--patch-size", "64", "--target-mpp", "1.0", "-q"]
    seen: list[str] = []
    for i in range(2):
        before = {p.stem for p in (out / "coords").glob("*.h5")} if out.exists() else set()
        r = CliRunner().invoke(main, [*args, "--shard", f"{i}/2"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        new = {p.stem for p in (out / "coords").glob("*.h5")} - before
        assert new == {s for s in "abcde" if _reference_shard(s, 2) == i}
        seen += sorted(new)
    assert sorted(seen) == list("abcde")
    rows = read_status(out)
    assert sorted(r["slide_id"] for r in rows) == list("abcde")  # no slide touched by both jobs
    bad = CliRunner().invoke(main, [*args, "--shard", "2/2"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error: --shard 2/2: i must be 0..1")


def test_embed_shard_selects_by_the_same_rule(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    tile_slides(sorted(slides.iterdir()), out, TilingConfig(patch_size=64, target_mpp=1.0))
    done: list[str] = []
    for i in range(3):
        summary = embed_slides(out, EmbedConfig(workers=0), runtime=RuntimeConfig(shard=Shard(i, 3)))
        ids = [r.slide_id for r in summary.results]
        assert ids == [s for s in "abcde" if _reference_shard(s, 3) == i]
        assert all(r.status == "ok" for r in summary.results)
        done += ids
    assert sorted(done) == list("abcde")


def test_classify_shards_then_one_gathering_run(slides: Path, tmp_path: Path) -> None:
    from wsi_pipeline.classify.stage import classify_slides

    prompts = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
    labels = tmp_path / "labels.csv"  # names slides of every shard: checked against the whole batch
    labels.write_text("slide_id,label\n" + "".join(f"{s},solid\n" for s in "abcde"))
    out = tmp_path / "out"
    tiling = TilingConfig(patch_size=64, target_mpp=1.0, min_tissue_area=2000.0)
    per_shard = []
    for i in range(2):
        s = classify_slides(sorted(slides.iterdir()), out, prompts, tiling=tiling, embed=EmbedConfig(workers=0),
                            labels=labels, runtime=RuntimeConfig(shard=Shard(i, 2)))
        assert s.predictions_csv.name == f"demo_shard-{i}-of-2.csv" and s.metrics is None and s.report_path is None
        assert [r.slide_id for r in s.rows] == [x for x in "abcde" if _reference_shard(x, 2) == i]
        per_shard += s.rows
    gathered = classify_slides(None, out, prompts, tiling=tiling, embed=EmbedConfig(workers=0), labels=labels)
    assert gathered.predictions_csv.name == "demo.csv" and gathered.metrics is not None
    assert sorted(r.slide_id for r in gathered.rows) == list("abcde")
    by_id = {r.slide_id: r for r in per_shard}
    for r in gathered.rows:  # the gathering run only scores: same numbers as the shard runs
        assert (r.status, r.predicted, r.probabilities) == (by_id[r.slide_id].status, by_id[r.slide_id].predicted,
                                                           by_id[r.slide_id].probabilities)
    embed_rows = [x for x in read_status(out) if x["stage"] == "embed"]
    assert sorted(x["slide_id"] for x in embed_rows if x["status"] == "ok") == list("abcde")  # each embedded once
