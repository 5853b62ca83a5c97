"""``wsi-pipeline`` command line: one thin function per verb, heavy imports inside.

Exit codes: 0 every slide ok (or skipped), 1 at least one slide failed, 2 usage error
(bad option, bad config, no inputs, duplicate slide ids, unwritable output folder).
Logging is configured here and only here: one line per problem, tracebacks only with -v.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .runtime.options import runtime_config as _runtime_config
from .runtime.options import runtime_options

#: ``tile`` options that are TilingConfig fields (a --config preset may set them too).
_TILING_PARAMS = ("backend", "target_mpp", "mag", "patch_size", "overlap", "min_tissue", "seg_level_mpp",
                  "threshold", "min_tissue_area", "min_hole_area", "mpp_csv", "default_mpp", "slide_params")
#: Reader libraries that log their own line about a file we already report in one line.
_NOISY_LOGGERS = ("tifffile", "tiffslide", "PIL", "h5py")


# -- logging and progress -----------------------------------------------------------------
class _TqdmHandler(logging.Handler):
    """Writes log lines above an active progress bar (stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _configure_logging(verbose: int, quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _TqdmHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("wsi_pipeline").setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL)


class _TqdmProgress:
    """An overall slide bar on stderr, plus (``unit`` given) a per-slide bar with items/s."""

    def __init__(self, desc: str, unit: str | None = None) -> None:
        self.desc = desc
        self.unit = unit
        self.bar: Any = None
        self.item_bar: Any = None

    def start(self, total_slides: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total_slides, desc=self.desc, unit="slide", file=sys.stderr, dynamic_ncols=True,
                        position=0)

    def start_slide(self, slide_id: str, total_items: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(slide_id[:40])
        if self.unit:
            from tqdm import tqdm

            if self.item_bar is not None:
                self.item_bar.close()
            self.item_bar = tqdm(total=total_items, desc=slide_id[:24], unit=self.unit, file=sys.stderr,
                                 dynamic_ncols=True, position=1, leave=False)

    def advance(self, n: int) -> None:
        if self.item_bar is not None:
            self.item_bar.update(n)

    def end_slide(self, slide_id: str, status: str) -> None:
        if self.item_bar is not None:
            self.item_bar.close()
            self.item_bar = None
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        for bar in (self.item_bar, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.item_bar = None


def _die(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit (2: usage error)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# -- inputs -------------------------------------------------------------------------------
def _collect(inputs: Iterable[str], list_file: str | None, recursive: bool) -> list[str]:
    """INPUTS plus ``--list`` expanded (folders, ``@list.txt``) into slide paths."""
    from .inputs import collect_inputs

    items = [*inputs, *([f"@{list_file}"] if list_file else [])]
    return [str(p) for p in collect_inputs(items, recursive=recursive)]


def _tiling_config(ctx: click.Context, config_file: str | None, params: dict[str, Any]) -> Any:
    """Preset (if any) overridden by the flags that were given explicitly."""
    from .config import TilingConfig

    base = TilingConfig.from_yaml(config_file) if config_file else TilingConfig()
    explicit = {
        name: value
        for name, value in params.items()
        if name in _TILING_PARAMS
        and ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                               click.core.ParameterSource.ENVIRONMENT)
    }
    if "mag" in explicit and "target_mpp" in explicit:
        raise click.UsageError("give either --target-mpp or --mag, not both")
    return base.merge(explicit)  # "mag" becomes target_mpp = 10 / mag


def verbosity_options(f: Any) -> Any:
    """``-v/--verbose`` and ``-q/--quiet``, accepted before or after the verb."""
    f = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bar.")(f)
    return click.option("-v", "--verbose", count=True, help="More detail (-v: debug log with tracebacks).")(f)


def _verbosity(ctx: click.Context, verbose: int, quiet: bool) -> bool:
    """Merge a verb's -v/-q with the group's, reconfigure logging; returns ``quiet``."""
    obj = ctx.ensure_object(dict)
    obj["verbose"] = max(int(obj.get("verbose", 0)), verbose)
    obj["quiet"] = bool(obj.get("quiet", False) or quiet)
    if verbose or quiet:
        _configure_logging(obj["verbose"], obj["quiet"])
    return obj["quiet"]


_TILING_OPTIONS = [
    click.option("--backend", default="auto", show_default=True, help="Slide reader: auto, openslide, tiffslide, image."),
    click.option("--target-mpp", type=float, default=0.5, show_default=True, help="Patch resolution in µm/px."),
    click.option("--mag", type=float, help="Alias: target mpp = 10 / mag (20 → 0.5 µm/px)."),
    click.option("--patch-size", type=int, default=256, show_default=True, help="Patch edge in px at the target mpp."),
    click.option("--overlap", type=float, default=0.0, show_default=True, help="Overlap as a fraction of the patch."),
    click.option("--min-tissue", type=float, default=0.25, show_default=True,
                 help="Tissue fraction a patch needs (0: any tissue)."),
    click.option("--seg-level-mpp", type=float, default=8.0, show_default=True,
                 help="Resolution of the segmentation image (µm/px)."),
    click.option("--threshold", default="otsu", show_default=True, help="Saturation threshold: otsu or 0..255."),
    click.option("--min-tissue-area", type=float, default=40000.0, show_default=True,
                 help="Remove tissue objects smaller than this (µm²)."),
    click.option("--min-hole-area", type=float, default=16000.0, show_default=True,
                 help="Fill holes smaller than this (µm²)."),
    click.option("--mpp-csv", type=click.Path(dir_okay=False), help="CSV 'slide,mpp' with per-slide resolutions."),
    click.option("--default-mpp", type=float, help="µm/px for slides without one (warned, recorded)."),
    click.option("--slide-params", type=click.Path(dir_okay=False),
                 help="CSV 'slide,<option>,…' of per-slide segmentation settings (e.g. threshold, min_tissue)."),
]


def tiling_options(f: Any) -> Any:
    """The ``tile`` options (TilingConfig fields); ``classify`` reuses them."""
    for option in reversed(_TILING_OPTIONS):
        f = option(f)
    return f



def _store_names() -> list[str]:
    from .store.features import store_names

    return store_names()


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


_EMBED_OPTIONS = [
    click.option("--model", default="convlm_demo", show_default=True,
                 help="Registered model (conch_v1, hf_clip, convlm_*), or open_clip:<arch> (see models/); "
                      "convlm_demo is a demo trained on synthetic tissue."),
    click.option("--weights", type=click.Path(exists=True),
                 help="Local weights (.safetensors, or a torch checkpoint read with weights_only=True; for hf_clip "
                      "the model folder) [the weights shipped in models/, if any]."),
    click.option("--adapter", type=click.Path(dir_okay=False, exists=True),
                 help="Context adapter (adapter.safetensors from 'train --adapter-only') trained on these weights."),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--workers", type=click.IntRange(min=0), default=_default_workers, show_default="cores - 1, max 8",
                 help="Reader processes (0: read in the main process)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:i."),
    click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
                 show_default=True, help="auto: bf16 on CUDA, fp32 on CPU."),
    click.option("--keep-rate", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                 help="Token keep rate at refining blocks (1.0: no refinement) [model default]."),
    click.option("--prune-layers", default=None, help="Refining blocks, 0-based, e.g. 3,6,9 [model default]."),
    click.option("--context", "context", default=None,
                 help="Prompt file whose classes give the context vector, or 'none'."),
    click.option("--store", type=click.Choice(_store_names()), default="h5", show_default=True),
    click.option("--slides", "slides_dir", type=click.Path(file_okay=False, exists=True),
                 help="Folder holding the slides, when they moved since tiling."),
    click.option("--region-size", type=click.IntRange(min=64), default=2048, show_default=True,
                 help="Edge of one batched read at the read level (px)."),
]


def embed_options(f: Any) -> Any:
    """The ``embed`` options (EmbedConfig fields); ``classify`` reuses them."""
    for option in reversed(_EMBED_OPTIONS):
        f = option(f)
    return f


def _block_indices(value: str | None, flag: str) -> tuple[int, ...] | None:
    """``"3,6,9"`` → ``(3, 6, 9)``; ``None`` stays ``None``."""
    from .errors import ConfigError

    if value is None:
        return None
    try:
        return tuple(int(v) for v in str(value).replace(" ", "").split(",") if v != "")
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: give block indices like 3,6,9") from None


def _embed_config(params: dict[str, Any], overwrite: bool = False) -> Any:
    from .embed.runner import EmbedConfig

    layers = _block_indices(params.get("prune_layers"), "--prune-layers")
    context = params.get("context")
    return EmbedConfig(
        model=params["model"], weights=params.get("weights"), batch_size=params["batch_size"],
        workers=params["workers"], device=params["device"], precision=params["precision"],
        keep_rate=params.get("keep_rate"), prune_layers=layers,
        context=None if context in (None, "none") else context, adapter=params.get("adapter"),
        store=params["store"],
        slides_dir=params.get("slides_dir"), region_size=params["region_size"], overwrite=overwrite,
    )


# -- verbs --------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-pipeline")
@verbosity_options
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Whole-slide-image tiling, ConVLM feature extraction and zero-shot subtyping."""
    _configure_logging(verbose, quiet)
    ctx.obj = {"verbose": verbose, "quiet": quiet}


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
                 help="Output folder (coords/, thumbnails/, tissue/, status.csv).")
@click.option("--list", "list_file", type=click.Path(dir_okay=False), help="Text file with one slide path per line.")
@click.option("--recursive", is_flag=True, help="Descend into sub-folders of folder inputs.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
                 help="YAML preset (configs/tiling/*.yaml); flags given here win.")
@tiling_options
@runtime_options
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs exist and validate.")
@verbosity_options
@click.pass_context
def tile(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, list_file: str | None, recursive: bool,
         config_file: str | None, overwrite: bool, verbose: int, quiet: bool, **params: Any) -> None:
    """Segment tissue and write patch coordinates for INPUTS (slides, folders or @list.txt)."""
    from .errors import WsiPipelineError
    from .tiling.stage import tile_slides

    t0 = time.perf_counter()
    quiet = _verbosity(ctx, verbose, quiet)
    try:
        config = _tiling_config(ctx, config_file, params)
        runtime = _runtime_config(params)
        slides = _collect(inputs, list_file, recursive)
        # raises before any work: duplicate ids, unknown backend, bad mpp CSV, unwritable -o
        results = tile_slides(slides, out_dir, config, overwrite=overwrite,
                              progress=None if quiet else _TqdmProgress("tile"), runtime=runtime)
    except WsiPipelineError as e:
        _die(str(e))
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    n_patches = sum(r.n_patches or 0 for r in results if r.status in ("ok", "skipped"))
    click.echo(
        f"tile: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"{n_patches} patches in {time.perf_counter() - t0:.1f} s -> {out_dir}"
    )
    ctx.exit(1 if counts["failed"] else 0)


@main.command()
@click.argument("slide")
@click.option("--backend", default="auto", show_default=True, help="Slide reader.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@verbosity_options
@click.pass_context
def info(ctx: click.Context, slide: str, backend: str, as_json: bool, verbose: int, quiet: bool) -> None:
    """Print the normalised metadata of SLIDE (levels, downsamples, mpp and its source)."""
    from .errors import WsiPipelineError
    from .slide import open_slide

    _verbosity(ctx, verbose, quiet)
    try:
        with open_slide(slide, backend) as s:
            meta = s.info.as_dict()
            meta["backend"] = s.backend
            mpp_known = s.info.mpp_x is not None and s.info.mpp_y is not None
            meta["level_mpp"] = [s.info.level_mpp(k) for k in range(s.info.level_count)] if mpp_known else None
    except WsiPipelineError as e:
        _die(str(e), code=1)
    if as_json:
        click.echo(json.dumps(meta, indent=2, ensure_ascii=False))
        return
    width = max(len(k) for k in meta)
    for key, value in meta.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif key == "level_mpp" and value is not None:
            value = ", ".join(f"{v:.4g}" for v in value)
        click.echo(f"{key.ljust(width)}  {value}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@embed_options
@runtime_options
@click.option("--overwrite", is_flag=True, help="Redo slides whose features exist and validate.")
@verbosity_options
@click.pass_context
def embed(ctx: click.Context, out_dir: str, overwrite: bool, verbose: int, quiet: bool, **params: Any) -> None:
    """Extract patch features for every slide tiled into OUT_DIR (out/coords/*.h5)."""
    from .embed.runner import embed_slides, find_coords_files
    from .errors import WsiPipelineError

    quiet = _verbosity(ctx, verbose, quiet)
    try:
        cfg = _embed_config(params, overwrite)
        runtime = _runtime_config(params)
        if not find_coords_files(out_dir):
            raise WsiPipelineError(f"no coords files in {Path(out_dir) / 'coords'}; run 'wsi-pipeline tile' first")
        summary = embed_slides(out_dir, cfg, progress=None if quiet else _TqdmProgress("embed", unit="patch"),
                               runtime=runtime)
    except WsiPipelineError as e:
        _die(str(e))
    click.echo(f"{summary.line} -> {Path(out_dir) / 'features' / summary.model_id}")
    ctx.exit(1 if summary.count("failed") else 0)


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Prompt file (YAML, or CONCH/MI-Zero JSON); see configs/prompts/.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--list", "list_file", type=click.Path(dir_okay=False), help="Text file with one slide path per line.")
@click.option("--recursive", is_flag=True, help="Descend into sub-folders of folder inputs.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Tiling YAML preset.")
@tiling_options
@embed_options
@runtime_options
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="K of top-K pooling [prompt file, else 50].")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), help="CSV slide_id,label: adds metrics.")
@click.option("--prompt-sets", type=click.IntRange(min=0), default=0, show_default=True,
              help="MI-Zero robustness: N random single-synonym prompt sets (needs --labels).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt-set sampling.")
@click.option("--no-visuals", is_flag=True, help="Skip heatmaps, montages and report.html.")
@verbosity_options
@click.pass_context
def classify(ctx: click.Context, inputs: tuple[str, ...], prompts_path: str, out_dir: str, list_file: str | None,
             recursive: bool, config_file: str | None, top_k: int | None, labels: str | None, prompt_sets: int,
             seed: int, no_visuals: bool, verbose: int, quiet: bool, **params: Any) -> None:
    """Tile and embed INPUTS where needed, then classify them zero-shot (no INPUTS: what OUT holds)."""
    from .classify.stage import classify_slides
    from .errors import WsiPipelineError

    quiet = _verbosity(ctx, verbose, quiet)
    try:
        tiling = _tiling_config(ctx, config_file, params)
        embed = _embed_config(params)
        runtime = _runtime_config(params)
        slides = _collect(inputs, list_file, recursive) if inputs or list_file else None
        summary = classify_slides(slides, out_dir, prompts_path, tiling=tiling, embed=embed, top_k=top_k,
                                  labels=labels, prompt_sets=prompt_sets, seed=seed, visuals=not no_visuals,
                                  progress=None if quiet else _TqdmProgress("classify", unit="patch"),
                                  runtime=runtime)
    except WsiPipelineError as e:
        _die(str(e))
    click.echo(summary.table())
    if summary.metrics:
        click.echo("")
        click.echo(summary.metrics_block())
    click.echo(summary.line)
    ctx.exit(1 if summary.n_failed else 0)


def _exporter_names() -> list[str]:
    from .export import exporter_names

    return exporter_names()


@main.command(name="export")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--to", "to", required=True, type=click.Choice(_exporter_names()), help="Layout to write.")
@click.option("-o", "--out", "dest", required=True, type=click.Path(file_okay=False), help="Destination folder.")
@click.option("--model-id", default=None, help="Features to export when OUT_DIR/features holds several models.")
@verbosity_options
@click.pass_context
def export(ctx: click.Context, out_dir: str, to: str, dest: str, model_id: str | None, verbose: int,
           quiet: bool) -> None:
    """Write OUT_DIR's coords (and features) in the layout CLAM or TRIDENT reads."""
    from .errors import WsiPipelineError
    from .export import export_outputs

    _verbosity(ctx, verbose, quiet)
    try:
        summary = export_outputs(out_dir, to, dest, model_id=model_id)
    except WsiPipelineError as e:
        _die(str(e))
    if summary.notice:
        click.echo(f"note: {summary.notice}")
    click.echo(summary.line)
    ctx.exit(1 if summary.count("failed") else 0)


@main.command()
@click.option("--data", required=True, help="ROI patches: one folder per class (ImageFolder) or a CSV path,label.")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Class prompts (same format as classify), e.g. configs/prompts/demo_train.yaml.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: model.safetensors (adapter.safetensors), config.json, train_log.json/.csv.")
@click.option("--model", default="convlm_demo", show_default=True,
              help="Registered model or open_clip:<arch> to train (conch_v1, hf_clip: --adapter-only).")
@click.option("--weights", type=click.Path(exists=True),
              help="Initial weights (fine-tuning), or the frozen base of --adapter-only [shipped weights, if any].")
@click.option("--adapter-only", is_flag=True,
              help="Freeze the whole model; train only a context adapter (writes adapter.safetensors).")
@click.option("--adapter-layers", default=None, help="Guided blocks of the adapter, 0-based [the refinement blocks].")
@click.option("--adapter-hidden", type=click.IntRange(min=1), default=None, help="Context-MLP hidden width [ViT width].")
@click.option("--adapter-alpha", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.1, show_default=True,
              help="Mixing weight of the context in the CLS query.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr-backbone", type=float, default=5e-4, show_default=True)
@click.option("--lr-text", type=float, default=5e-4, show_default=True)
@click.option("--lr-head", type=float, default=1e-3, show_default=True)
@click.option("--freeze-backbone", is_flag=True, help="Keep the vision tower fixed.")
@click.option("--freeze-text", is_flag=True, help="Keep the text tower fixed.")
@click.option("--no-balanced", "balanced", is_flag=True, flag_value=False, default=True,
              help="Sample uniformly instead of class-balanced.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.1, show_default=True)
@click.option("--context-mode", type=click.Choice(["agnostic", "label", "mix", "none"]), default="agnostic",
              show_default=True, help="Context fed to the refining blocks while training (label = paper, leaks).")
@click.option("--w-context-l1", type=click.FloatRange(min=0.0), default=0.1, show_default=True)
@click.option("--w-cls-l1", type=click.FloatRange(min=0.0), default=0.1, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.05, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--no-flips", "flips", is_flag=True, flag_value=False, default=True, help="No flip augmentation.")
@click.option("--no-rot90", "rot90", is_flag=True, flag_value=False, default=True, help="No 90° rotations.")
@click.option("--color-jitter", type=click.FloatRange(min=0.0), default=0.1, show_default=True,
              help="Colour-jitter strength (0: off).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--save-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@verbosity_options
@click.pass_context
def train(ctx: click.Context, data: str, prompts_path: str, out_dir: str, verbose: int, quiet: bool,
          **params: Any) -> None:
    """Train (or fine-tune) a ConVLM on labelled ROI patches against class prompts."""
    from .errors import WsiPipelineError
    from .train import TqdmTrainProgress, TrainConfig, train_model

    quiet = _verbosity(ctx, verbose, quiet)
    try:
        if not Path(data).exists():
            raise WsiPipelineError(f"--data {data} does not exist")
        params["adapter_layers"] = _block_indices(params.get("adapter_layers"), "--adapter-layers")
        cfg = TrainConfig(data=data, prompts=prompts_path, out_dir=out_dir, **params)
        result = train_model(cfg, progress=None if quiet else TqdmTrainProgress())
    except WsiPipelineError as e:
        _die(str(e))
    final = result.final
    click.echo(f"train: {len(result.history)} epochs in {result.seconds:.0f} s; "
               f"val balanced accuracy {final.get('val_bacc', float('nan')):.3f}; "
               f"weights {result.weights} (sha256 {result.sha256[:12]})")


@main.command()
@click.option("-o", "--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--per-class", "n_per_class", type=click.IntRange(min=1), default=2, show_default=True,
              help="Held-out slides per tumour class (3 classes).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the first slide [demo range].")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), help="Weights [the shipped demo model].")
@click.option("--no-visuals", is_flag=True, help="Skip heatmaps, montages and report.html.")
@verbosity_options
@click.pass_context
def demo(ctx: click.Context, out_dir: str, n_per_class: int, seed: int | None, weights: str | None,
         no_visuals: bool, verbose: int, quiet: bool) -> None:
    """Generate held-out synthetic slides and classify them zero-shot with the shipped demo model."""
    from .demo import DEMO_SEED, run_demo
    from .errors import WsiPipelineError

    quiet = _verbosity(ctx, verbose, quiet)
    try:
        result = run_demo(out_dir, n_per_class=n_per_class, seed=DEMO_SEED if seed is None else seed,
                          weights=weights, visuals=not no_visuals,
                          progress=None if quiet else _TqdmProgress("demo", unit="patch"))
    except WsiPipelineError as e:
        _die(str(e))
    if result.notice:
        click.echo(f"note: {result.notice}")
    click.echo(result.table())
    if result.report_path:
        click.echo(f"report: {result.report_path}")
    click.echo(f"demo finished in {result.seconds:.0f} s -> {result.out_dir}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
