"""``wsi-pipeline`` command line: one thin function per verb, heavy imports inside.

Exit codes: 0 every slide ok (or skipped), 1 at least one slide failed, 2 usage error
(bad option, bad config, no inputs, duplicate slide ids, unwritable output folder), 130
interrupted (Ctrl-C). Every error is one ``error: ...`` line on stderr, click's own usage
errors included. Logging is configured here and only here: one line per problem,
tracebacks only with -v.

``tile``, ``embed`` and ``classify`` file their options under sections (``--help`` lists
them by stage) and take ``--config run.yaml``, a run config holding options of any stage
(:mod:`wsi_pipeline.runconfig`): flags win over the file, the file wins over the defaults.
Each writes the effective options to ``OUT/run_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from . import __version__
from .resources import shipped_names
from .runtime.options import RUNTIME_OPTIONS
from .runtime.options import runtime_config as _runtime_config

#: ``tile`` options that are TilingConfig fields (a --config preset may set them too).
_TILING_PARAMS = ("backend", "target_mpp", "mag", "patch_size", "overlap", "min_tissue", "seg_level_mpp",
                  "threshold", "min_tissue_area", "min_hole_area", "mpp_csv", "default_mpp", "slide_params",
                  "max_upsample")
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


# -- option sections ----------------------------------------------------------------------
IO, TILING, EMBEDDING, RUNTIME, CLASSIFICATION, VERBOSITY = (
    "Input and output", "Tiling", "Embedding", "Runtime", "Classification", "Verbosity and help")
#: Options that are actions or the config itself, not settings: not written to run_config.yaml.
_NOT_WRITTEN = ("config", "overwrite", "verbose", "quiet", "help", "shard")


def section(title: str, *decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Apply click options/arguments and file them under ``title`` (``--help`` and run_config.yaml)."""

    def decorate(f: Any) -> Any:
        for decorator in reversed(decorators):
            f = decorator(f)
        for param in f.__click_params__[-len(decorators):]:
            param.section = title
        return f

    return decorate


def _section_of(param: click.Parameter) -> str | None:
    return getattr(param, "section", None)


def _config_key(param: click.Parameter) -> str:
    """The run-config key of a parameter: its long flag (``--out`` → ``out``) or the argument's name."""
    from .config import option_key

    longs = [o for o in param.opts if o.startswith("--")] if isinstance(param, click.Option) else []
    return option_key(longs[0][2:]) if longs else str(param.name)


class OldNamesOption(click.Option):
    """An option that still accepts its former flag names (``old_names``) but shows only its current one."""

    def __init__(self, *args: Any, old_names: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_names = tuple(old_names)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts = self.opts
        self.opts = [o for o in opts if o not in self.old_names]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


class SectionedCommand(click.Command):
    """A verb whose ``--help`` lists its options under section titles, in the order they first appear."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        help_option = self.get_help_option(ctx)
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is None:  # arguments are named in the usage line and the description
                continue
            title = _section_of(param) or (next(reversed(groups), "Options") if param is help_option
                                           else "Other options")
            groups.setdefault(title, []).append(record)
        for title, records in groups.items():
            with formatter.section(title):
                formatter.write_dl(records)


class _Cli(click.Group):
    """The ``wsi-pipeline`` group: every error one ``error: ...`` line (usage errors exit 2), Ctrl-C exits 130."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort outside standalone mode
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split()).rstrip('.')}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


# -- run config ---------------------------------------------------------------------------
_RANK = {ParameterSource.DEFAULT: 0, ParameterSource.DEFAULT_MAP: 1}  # flags and env: 2
_TILING_EXTRA = "wsi_pipeline.tiling_extra"


def _tiling_fields() -> set[str]:
    from .config import TilingConfig

    return {f.name for f in dataclasses.fields(TilingConfig)}


def _key_sections() -> dict[str, str]:
    """Every run-config key of ``tile``, ``embed`` and ``classify`` → its section."""
    keys = dict.fromkeys(_tiling_fields(), TILING)
    for verb in (tile, embed, classify):
        for param in verb.params:
            if _section_of(param) is not None:
                keys.setdefault(_config_key(param), _section_of(param))  # type: ignore[arg-type]
    return keys


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--config``: the file's options become this command's defaults (flags still win).

    Keys of this command go to ``ctx.default_map`` (checked by their click types here, so that
    an error names the file); tiling settings without a flag are kept for :func:`_tiling_config`;
    keys of the other verbs are accepted and unused; unknown keys are refused.
    """
    if value is None or ctx.resilient_parsing:
        return
    from .config import TilingConfig
    from .errors import WsiPipelineError
    from .runconfig import read_run_config

    try:
        path, values = read_run_config(value, known=set(_key_sections()) - {"config", "help"})
    except WsiPipelineError as e:
        raise click.UsageError(str(e)) from None
    params = {_config_key(p): p for p in ctx.command.params}
    defaults: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, v in values.items():
        if key in params:
            param = params[key]
            if isinstance(v, str) and (param.multiple or param.nargs == -1):
                v = [v]  # `inputs: slides/`, one item without list brackets
            if isinstance(param.type, click.types.IntParamType) and isinstance(v, float) and not v.is_integer():
                raise click.UsageError(f"config {path}: {key}: expected an integer, got {v!r}")
            try:
                param.type_cast_value(ctx, v)
            except click.BadParameter as e:
                raise click.UsageError(f"config {path}: {key}: {e.message}") from None
            except (TypeError, ValueError):  # a YAML list or mapping where one value belongs
                want = "a list" if param.multiple or param.nargs != 1 else "one value"
                raise click.UsageError(f"config {path}: {key}: expected {want} of type {param.type.name}, "
                                       f"got {type(v).__name__} {v!r}") from None
            defaults[str(param.name)] = v
        elif key in _tiling_fields() and "target_mpp" in params:
            extra[key] = v
    try:
        TilingConfig().merge(extra)  # checked here, so that the error names the file
    except WsiPipelineError as e:
        raise click.UsageError(f"config {path}: {e}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_TILING_EXTRA] = extra


config_option = click.option(
    "--config", "config_file", metavar="FILE|NAME", is_eager=True, expose_value=False, callback=_load_config,
    help=f"Run config (YAML; options of any stage, e.g. OUT/run_config.yaml) or a shipped tiling preset "
         f"({', '.join(shipped_names('tiling'))}). Flags win over the file, the file over the defaults.")


def _plain(key: str, value: Any) -> Any:
    """A parameter value as written to run_config.yaml: tuples as lists, existing paths absolute, ``out: .``."""
    from .runconfig import PATH_KEYS

    if isinstance(value, (tuple, list)):
        return [_plain(key, v) for v in value]
    if key == "out":
        return "."  # the folder that holds run_config.yaml
    if key not in PATH_KEYS or not isinstance(value, str):
        return value
    at, path = ("@", value[1:]) if value.startswith("@") else ("", value)
    return at + os.path.abspath(path) if os.path.exists(path) else value


def _write_run_config(ctx: click.Context, out_dir: str, tiling: Any = None) -> None:
    """``OUT/run_config.yaml``: this verb's effective options over the keys an earlier verb wrote there."""
    from .runconfig import read_written_config, write_run_config

    key_sections = _key_sections()
    values = {k: v for k, v in read_written_config(out_dir).items() if k in key_sections}
    for param in ctx.command.params:
        key = _config_key(param)
        if _section_of(param) is not None and key not in _NOT_WRITTEN and param.name in ctx.params:
            values[key] = _plain(key, ctx.params[param.name])
    if tiling is not None:
        values.pop("mag", None)  # resolved into target_mpp
        values.update({k: _plain(k, v) for k, v in dataclasses.asdict(tiling).items()})
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key not in _NOT_WRITTEN:
            sections.setdefault(key_sections[key], {})[key] = value
    order = (IO, TILING, EMBEDDING, RUNTIME, CLASSIFICATION, VERBOSITY)
    verb = ctx.info_name or str(ctx.command.name)
    header = (f"wsi-pipeline {__version__}: the options of the last run in this folder (flags > --config > "
              f"defaults).\nRepeat it: wsi-pipeline {verb} --config <this file>  (-o DIR: into another folder)")
    write_run_config(out_dir, {t: sections[t] for t in order if t in sections}, header)


# -- inputs -------------------------------------------------------------------------------
def _input_items(inputs: Iterable[str], list_file: str | None) -> list[str]:
    """INPUTS plus ``--list`` as one list of inputs (files, folders, ``@list.txt``)."""
    return [*inputs, *([f"@{list_file}"] if list_file else [])]


def _collect(inputs: Iterable[str], list_file: str | None, recursive: bool) -> list[str]:
    """INPUTS plus ``--list`` expanded (folders, ``@list.txt``) into slide paths."""
    from .inputs import collect_inputs

    return [str(p) for p in collect_inputs(_input_items(inputs, list_file), recursive=recursive)]


def _tiling_config(ctx: click.Context, params: dict[str, Any]) -> Any:
    """Defaults, then the run config (``--config``), then the flags given explicitly."""
    from .config import TilingConfig
    from .errors import ConfigError

    values = {name: params[name] for name in _TILING_PARAMS}
    mag = values.pop("mag")
    if mag is not None:
        rank_mag, rank_mpp = (_RANK.get(ctx.get_parameter_source(n), 2) for n in ("mag", "target_mpp"))  # type: ignore[arg-type]
        if rank_mag == rank_mpp:
            raise ConfigError("give either --target-mpp or --mag, not both")
        if rank_mag > rank_mpp:
            del values["target_mpp"]
            values["mag"] = mag  # merge() turns it into target_mpp = 10 / mag
    return TilingConfig().merge(ctx.meta.get(_TILING_EXTRA, {})).merge(values)


def _resolve(kind: str, value: str, flag: str) -> str:
    """A path as given, or the shipped file named ``value`` (``--prompts demo``)."""
    from .resources import resolve

    return str(resolve(kind, value, flag))


def verbosity_options(f: Any) -> Any:
    """``-v/--verbose`` and ``-q/--quiet``, accepted before or after the verb."""
    return section(
        VERBOSITY,
        click.option("-v", "--verbose", count=True, help="More detail (-v: debug log with tracebacks)."),
        click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bar."),
    )(f)


def _verbosity(ctx: click.Context, verbose: int, quiet: bool) -> bool:
    """Merge a verb's -v/-q with the group's, reconfigure logging; returns ``quiet``."""
    obj = ctx.ensure_object(dict)
    obj["verbose"] = max(int(obj.get("verbose", 0)), verbose)
    obj["quiet"] = bool(obj.get("quiet", False) or quiet)
    if verbose or quiet:
        _configure_logging(obj["verbose"], obj["quiet"])
    return obj["quiet"]


def _slide_io(outputs: str) -> list[Callable[[Any], Any]]:
    """INPUTS, ``-o``, ``--list``, ``--recursive`` and ``--config`` of the verbs that take slides."""
    return [
        click.argument("inputs", nargs=-1),
        click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help=f"Output folder ({outputs})."),
        click.option("--list", "list_file", type=click.Path(dir_okay=False),
                     help="Text file with one slide path per line."),
        click.option("--recursive", is_flag=True, help="Descend into sub-folders of folder inputs."),
        config_option,
    ]

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
    click.option("--max-upsample", type=click.FloatRange(min=1.0), default=None,
                 help="Refuse slides scanned coarser than the target by more than this factor (1: never "
                      "upsample) [allow, with a warning per slide]."),
    click.option("--slide-params", type=click.Path(dir_okay=False),
                 help="CSV 'slide,<option>,…' of per-slide segmentation settings (e.g. threshold, min_tissue)."),
]


def _store_names() -> list[str]:
    from .store.features import store_names

    return store_names()


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


_EMBED_OPTIONS = [
    click.option("--model", default="convlm_demo", show_default=True,
                 help="Registered model (conch_v1, hf_clip, convlm_*), or open_clip:<arch> (cards: models/); "
                      "convlm_demo is a demo trained on synthetic tissue."),
    click.option("--weights", type=click.Path(exists=True),
                 help="Local weights (.safetensors, or a torch checkpoint read with weights_only=True; for hf_clip "
                      "the model folder) [the model's shipped weights, if any]."),
    click.option("--random-init", is_flag=True,
                 help="Run a model that has no weights here with a seeded random init (speed, plumbing): its "
                      "features mean nothing. Test models (convlm_test, conch_test) need no flag."),
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
    click.option("--refine-layers", "--prune-layers", "refine_layers", cls=OldNamesOption, old_names=("--prune-layers",),
                 default=None, help="Refining blocks, 0-based, e.g. 3,6,9 [model default]."),
    click.option("--context", "context", default=None,
                 help="Prompt file (or shipped name) that gives the context vector (its 'context:' sentence, "
                      "else its classes), or 'none'."),
    click.option("--store", type=click.Choice(_store_names()), default="h5", show_default=True),
    click.option("--slides", "slides_dir", type=click.Path(file_okay=False, exists=True),
                 help="Folder holding the slides, when they moved since tiling."),
    click.option("--region-size", type=click.IntRange(min=64), default=2048, show_default=True,
                 help="Edge of one batched read at the read level (px)."),
]

_CLASSIFY_OPTIONS = [
    click.option("--prompts", "prompts_path", required=True, metavar="FILE|NAME",
                 help=f"Prompt file (YAML, or CONCH/MI-Zero JSON) or a shipped one "
                      f"({', '.join(shipped_names('prompts'))})."),
    click.option("--top-k", type=click.IntRange(min=1), default=None, help="K of top-K pooling [prompt file, else 50]."),
    click.option("--labels", type=click.Path(dir_okay=False, exists=True), help="CSV slide_id,label: adds metrics."),
    click.option("--prompt-sets", type=click.IntRange(min=0), default=0, show_default=True,
                 help="MI-Zero robustness: N random single-synonym prompt sets (needs --labels)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt-set sampling."),
]


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
    from .embed.stage import EmbedConfig

    layers = _block_indices(params.get("refine_layers"), "--refine-layers")
    context = params.get("context")
    return EmbedConfig(
        model=params["model"], weights=params.get("weights"), random_init=bool(params.get("random_init")),
        batch_size=params["batch_size"],
        workers=params["workers"], device=params["device"], precision=params["precision"],
        keep_rate=params.get("keep_rate"), refine_layers=layers,
        context=None if context in (None, "none") else _resolve("prompts", context, "--context"),
        adapter=params.get("adapter"), store=params["store"],
        slides_dir=params.get("slides_dir"), region_size=params["region_size"], overwrite=overwrite,
    )


# -- verbs --------------------------------------------------------------------------------
@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-pipeline")
@verbosity_options
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Whole-slide-image tiling, ConVLM feature extraction and zero-shot subtyping."""
    _configure_logging(verbose, quiet)
    ctx.obj = {"verbose": verbose, "quiet": quiet}


@main.command(cls=SectionedCommand)
@section(IO, *_slide_io("coords/, thumbnails/, tissue/, status.csv, run_config.yaml"),
         click.option("--overwrite", is_flag=True, help="Redo slides whose outputs exist and validate."))
@section(TILING, *_TILING_OPTIONS)
@section(RUNTIME, *RUNTIME_OPTIONS)
@verbosity_options
@click.pass_context
def tile(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, list_file: str | None, recursive: bool,
         overwrite: bool, verbose: int, quiet: bool, **params: Any) -> None:
    """Segment tissue and write patch coordinates for INPUTS (slides, folders or @list.txt)."""
    from .errors import WsiPipelineError
    from .tiling.stage import tile_slides

    t0 = time.perf_counter()
    quiet = _verbosity(ctx, verbose, quiet)
    try:
        config = _tiling_config(ctx, params)
        runtime = _runtime_config(params)
        slides = _collect(inputs, list_file, recursive)
        # raises before any work: duplicate ids, unknown backend, bad mpp CSV, unwritable -o
        results = tile_slides(slides, out_dir, config, overwrite=overwrite,
                              progress=None if quiet else _TqdmProgress("tile"), runtime=runtime)
        _write_run_config(ctx, out_dir, tiling=config)
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


@main.command(cls=SectionedCommand)
@section(IO,
         click.argument("out", type=click.Path(file_okay=False, exists=True)),
         config_option,
         click.option("--overwrite", is_flag=True, help="Redo slides whose features exist and validate."))
@section(EMBEDDING, *_EMBED_OPTIONS)
@section(RUNTIME, *RUNTIME_OPTIONS)
@verbosity_options
@click.pass_context
def embed(ctx: click.Context, out: str, overwrite: bool, verbose: int, quiet: bool, **params: Any) -> None:
    """Extract patch features for every slide tiled into OUT (OUT/coords/*.h5; or 'out' of --config)."""
    from .embed.stage import embed_slides, find_coords_files
    from .errors import WsiPipelineError

    quiet = _verbosity(ctx, verbose, quiet)
    try:
        cfg = _embed_config(params, overwrite)
        runtime = _runtime_config(params)
        if not find_coords_files(out):
            raise WsiPipelineError(f"no coords files in {Path(out) / 'coords'}; run 'wsi-pipeline tile' first")
        summary = embed_slides(out, cfg, progress=None if quiet else _TqdmProgress("embed", unit="patch"),
                               runtime=runtime)
        _write_run_config(ctx, out)
    except WsiPipelineError as e:
        _die(str(e))
    click.echo(f"{summary.line} -> {Path(out) / 'features' / summary.model_id}")
    ctx.exit(1 if summary.count("failed") else 0)


@main.command(cls=SectionedCommand)
@section(IO, *_slide_io("predictions/, metrics.json, report.html, run_config.yaml, …"),
         click.option("--no-visuals", is_flag=True, help="Skip heatmaps, montages and report.html."))
@section(TILING, *_TILING_OPTIONS)
@section(EMBEDDING, *_EMBED_OPTIONS)
@section(RUNTIME, *RUNTIME_OPTIONS)
@section(CLASSIFICATION, *_CLASSIFY_OPTIONS)
@verbosity_options
@click.pass_context
def classify(ctx: click.Context, inputs: tuple[str, ...], prompts_path: str, out_dir: str,
             list_file: str | None, recursive: bool, top_k: int | None, labels: str | None, prompt_sets: int,
             seed: int, no_visuals: bool, verbose: int, quiet: bool, **params: Any) -> None:
    """Tile and embed INPUTS where needed, then classify them zero-shot (no INPUTS: what OUT holds)."""
    from .classify.stage import classify_slides
    from .errors import WsiPipelineError

    quiet = _verbosity(ctx, verbose, quiet)
    try:
        prompts = _resolve("prompts", prompts_path, "--prompts")
        tiling = _tiling_config(ctx, params)
        embed = _embed_config(params)
        runtime = _runtime_config(params)
        items = _input_items(inputs, list_file) or None  # expanded once, by classify_slides
        typed = [f"--{n.replace('_', '-')}" for n in _TILING_PARAMS
                 if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
        if items is None and typed:
            logging.getLogger("wsi_pipeline.cli").warning(
                "%s not used: without INPUTS nothing is tiled; the slides in %s are scored as they were tiled",
                ", ".join(typed), out_dir)
        summary = classify_slides(items, out_dir, prompts, tiling=tiling, embed=embed, top_k=top_k,
                                  labels=labels, prompt_sets=prompt_sets, seed=seed, visuals=not no_visuals,
                                  progress=None if quiet else _TqdmProgress("classify", unit="patch"),
                                  runtime=runtime, recursive=recursive)
        _write_run_config(ctx, out_dir, tiling=summary.tiling or tiling)
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


@main.command(cls=SectionedCommand)
@section(
    "Data and output",
    click.option("--data", required=True, help="ROI patches: one folder per class (ImageFolder) or a CSV path,label."),
    click.option("--prompts", "prompts_path", required=True, metavar="FILE|NAME",
                 help="Class prompts (same format as classify), or a shipped file, e.g. demo_train."),
    click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
                 help="Run folder: model.safetensors (adapter.safetensors), config.json, train_log.json/.csv."),
    click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.1, show_default=True),
    click.option("--no-balanced", "balanced", is_flag=True, flag_value=False, default=True,
                 help="Sample uniformly instead of class-balanced."),
    click.option("--no-flips", "flips", is_flag=True, flag_value=False, default=True, help="No flip augmentation."),
    click.option("--no-rot90", "rot90", is_flag=True, flag_value=False, default=True, help="No 90° rotations."),
    click.option("--color-jitter", type=click.FloatRange(min=0.0), default=0.1, show_default=True,
                 help="Colour-jitter strength (0: off)."),
)
@section(
    "Model",
    click.option("--model", default="convlm_demo", show_default=True,
                 help="Registered model or open_clip:<arch> to train (conch_v1, hf_clip: --adapter-only)."),
    click.option("--weights", type=click.Path(exists=True),
                 help="Initial weights (fine-tuning; full training without it starts from a random init), or the "
                      "frozen base of --adapter-only [there: the shipped weights, if any]."),
    click.option("--adapter-only", is_flag=True,
                 help="Freeze the whole model; train only a context adapter (writes adapter.safetensors)."),
    click.option("--adapter-layers", default=None, help="Guided blocks of the adapter, 0-based [the refining blocks]."),
    click.option("--adapter-hidden", type=click.IntRange(min=1), default=None,
                 help="Context-MLP hidden width [ViT width]."),
    click.option("--adapter-alpha", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.1, show_default=True,
                 help="Mixing weight of the context in the CLS query."),
    click.option("--freeze-backbone", is_flag=True, help="Keep the vision tower fixed."),
    click.option("--freeze-text", is_flag=True, help="Keep the text tower fixed."),
    click.option("--context-mode", type=click.Choice(["agnostic", "label", "mix", "none"]), default="agnostic",
                 show_default=True, help="Context fed to the refining blocks while training (label = paper, leaks)."),
)
@section(
    "Optimisation",
    click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--lr-backbone", type=float, default=5e-4, show_default=True),
    click.option("--lr-text", type=float, default=5e-4, show_default=True),
    click.option("--lr-head", type=float, default=1e-3, show_default=True),
    click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.05, show_default=True),
    click.option("--warmup-steps", type=click.IntRange(min=0), default=30, show_default=True),
    click.option("--w-context-l1", type=click.FloatRange(min=0.0), default=0.1, show_default=True),
    click.option("--w-cls-l1", type=click.FloatRange(min=0.0), default=0.1, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
)
@section(
    RUNTIME,
    click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads."),
    click.option("--save-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True),
)
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
        prompts = _resolve("prompts", prompts_path, "--prompts")
        cfg = TrainConfig(data=data, prompts=prompts, out_dir=out_dir, **params)
        result = train_model(cfg, progress=None if quiet else TqdmTrainProgress())
    except WsiPipelineError as e:
        _die(str(e))
    final = result.final
    click.echo(f"train: {len(result.history)} epochs in {result.seconds:.0f} s; "
               f"{_val_line(final.get('val_bacc'))}; "
               f"weights {result.weights} (sha256 {result.sha256[:12]})")


def _val_line(bacc: float | None) -> str:
    """The validation part of train's last line (``--val-fraction 0``: no validation set, not nan)."""
    return "no validation set" if bacc is None or bacc != bacc else f"val balanced accuracy {bacc:.3f}"


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
