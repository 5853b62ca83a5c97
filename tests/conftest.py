"""Shared pytest fixtures: synthetic slides with known truth (see ``slide_factory.py``).

Every slide fixture is session-scoped and built lazily on first use, so a test file that
needs none of them pays nothing. Fixtures return :class:`slide_factory.FixtureSlide`
(``.path``, ``.mask``, ``.mpp``, ``.size``, ``.downsamples``, ``.pixels(x, y, w, h)``).

Generated files are also kept in pytest's cache folder under a key that hashes the
fixture spec, the generator and writer sources and the codec versions; a later session
copies them into its own temporary folder instead of regenerating (the 8k SVS takes ~2 s
to make). ``WSI_TEST_SLIDE_CACHE=0`` or ``-p no:cacheprovider`` turns this off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at test time
sys.path.insert(0, str(Path(__file__).parent))

import slide_factory  # noqa: E402
from slide_factory import FixtureSlide, make_corrupt_files, make_roi_png, make_slide, slide_truth  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures logging process-wide; undo it so that later tests see the defaults."""
    import logging

    names = ["", "wsi_pipeline", "tifffile", "tiffslide", "PIL", "h5py"]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    logging.getLogger().handlers[:] = handlers


#: Standard fixture geometry: (width, height, mpp, layout, downsamples, seed).
SVS_SPEC = dict(width=8192, height=6144, mpp=0.25, layout="svs", levels=(1, 4, 16, 64), seed=0)
TIFF_SPEC = dict(width=4096, height=3072, mpp=0.5, layout="generic", levels=(1, 4, 16), seed=1)
NOMPP_SPEC = dict(width=2048, height=1536, mpp=None, layout="generic", levels=(1, 4), seed=2)
BLANK_SPEC = dict(width=2048, height=1536, mpp=0.5, layout="svs", levels=(1, 4), seed=4, n_blobs=0)


def _cache_key(name: str, spec: dict[str, object]) -> str:
    import imagecodecs
    import tifffile

    from wsi_pipeline.slide import write

    h = hashlib.sha256(json.dumps([name, spec], sort_keys=True).encode())
    for module in (slide_factory, write):
        h.update(Path(module.__file__).read_bytes())  # type: ignore[arg-type]
    h.update(f"{tifffile.__version__} {imagecodecs.__version__}".encode())
    return h.hexdigest()[:16]


def _build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str,
           spec: dict[str, object]) -> FixtureSlide:
    target = tmp_path_factory.mktemp("slides") / name
    args = dict(spec)
    width, height = args.pop("width"), args.pop("height")
    cache = getattr(request.config, "cache", None)
    if cache is None or os.environ.get("WSI_TEST_SLIDE_CACHE", "1") == "0":
        return make_slide(target, width, height, **args)  # type: ignore[arg-type]
    cached = Path(cache.mkdir("wsi-test-slides")) / f"{_cache_key(name, spec)}-{name}"
    if not cached.is_file():
        make_slide(cached, width, height, **args)  # type: ignore[arg-type]  # written atomically
    shutil.copyfile(cached, target)  # tests may damage their copy, never the cache
    return slide_truth(target, width, height, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def svs_slide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    """Aperio-SVS layout, 8192×6144 at 0.25 µm/px, levels 1/4/16/64, JPEG, thumbnail page."""
    return _build(request, tmp_path_factory, "tissue.svs", SVS_SPEC)


@pytest.fixture(scope="session")
def tiff_slide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    """Generic pyramidal TIFF, 4096×3072 at 0.5 µm/px (resolution in cm), levels 1/4/16."""
    return _build(request, tmp_path_factory, "tissue.tif", TIFF_SPEC)


@pytest.fixture(scope="session")
def nompp_slide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    """Generic pyramidal TIFF without any resolution, 2048×1536, levels 1/4."""
    return _build(request, tmp_path_factory, "nompp.tif", NOMPP_SPEC)


@pytest.fixture(scope="session")
def blank_slide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    """Glass only (no tissue), SVS layout, 2048×1536 at 0.5 µm/px."""
    return _build(request, tmp_path_factory, "blank.svs", BLANK_SPEC)


@pytest.fixture(scope="session")
def roi_png(tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    """A 384×256 PNG with one tissue blob, 0.5 µm/px stored as its dpi."""
    return make_roi_png(tmp_path_factory.mktemp("roi") / "roi.png", 384, 256, mpp=0.5)


@pytest.fixture(scope="session")
def corrupt_files(tmp_path_factory: pytest.TempPathFactory, blank_slide: FixtureSlide) -> dict[str, Path]:
    """``zero_byte``, ``truncated`` (first 20 % of a real .svs), ``text`` (named .svs) and
    ``unsupported`` (.xyz) files."""
    return make_corrupt_files(tmp_path_factory.mktemp("corrupt"), blank_slide.path)
