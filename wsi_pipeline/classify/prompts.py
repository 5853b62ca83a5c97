"""Zero-shot prompt files: load, validate with file positions, expand, hash and sample.

A prompt file (YAML) looks like::

    name: nsclc
    placeholder: CLASSNAME          # optional, this is the default
    templates:
      - an H&E image of CLASSNAME.
    classes:                        # ordered: column order of every output
      LUAD: [lung adenocarcinoma, adenocarcinoma]
      LUSC: [lung squamous cell carcinoma, squamous cell carcinoma]
    top_k: 50                       # optional, int or list; the first value is the primary K
    context: an H&E image of lung   # optional, text used as embedding context

The CONCH / MI-Zero JSON layout (``{"0": {"classnames": {...}, "templates": [...]}}``, class
values a list of synonyms or one string) is accepted too. Every validation error is a
:class:`~wsi_pipeline.errors.PromptFileError` of the form ``file:line:column: field: problem``.
Two classes with the same synonyms (identical prompts: they would always tie) are refused like
a synonym repeated inside one class. A file above :data:`MAX_PROMPT_FILE_BYTES`, or a JSON
document whose top level is no prompt set (a GeoJSON passed by mistake), is refused before
the YAML parse, which is slow on large input.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import ConfigError, PromptFileError
from ..store.atomic import atomic_write_text

_logger = logging.getLogger(__name__)

DEFAULT_PLACEHOLDER = "CLASSNAME"
HASH_FORMAT = 1  # bump when the canonical form hashed by PromptSet.sha256 changes

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NATIVE_KEYS = ("name", "placeholder", "templates", "classes", "top_k", "context")
_CONCH_KEYS = ("classnames", "templates")
#: Largest prompt file read: a few classes with synonyms and templates take a few kB.
MAX_PROMPT_FILE_BYTES = 2**20
_GEOJSON_TYPES = ("FeatureCollection", "Feature", "GeometryCollection", "Polygon", "MultiPolygon", "Point",
                  "MultiPoint", "LineString", "MultiLineString")


@dataclass(frozen=True, eq=False)
class PromptSet:
    """One zero-shot task: classes with synonyms, prompt templates and pooling defaults.

    Attributes
    ----------
    name : str
        Task name (e.g. ``nsclc``).
    templates : tuple of str
        Templates, each containing ``placeholder`` at least once.
    classes : Mapping[str, tuple of str]
        Ordered class id -> synonyms; the order is the column order of every output.
    placeholder : str
        Literal replaced by a synonym in every template.
    top_k : tuple of int
        K values for top-K pooling (empty: the caller's default); the first is the primary K.
    context : str or None
        Text used as embedding context.
    source : str or None
        Where the set was loaded from (not part of equality or the hash).
    """

    name: str
    templates: tuple[str, ...]
    classes: Mapping[str, tuple[str, ...]]
    placeholder: str = DEFAULT_PLACEHOLDER
    top_k: tuple[int, ...] = ()
    context: str | None = None
    source: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("templates", tuple(self.templates))
        set_("classes", MappingProxyType({str(c): tuple(s) for c, s in dict(self.classes).items()}))
        set_("top_k", (self.top_k,) if isinstance(self.top_k, int) else tuple(self.top_k))
        _validate(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptSet) and self.sha256 == other.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class ids in file order."""
        return tuple(self.classes)

    def expand(self) -> dict[str, list[str]]:
        """Fill every template with every synonym.

        Returns
        -------
        dict
            Class id -> ``len(synonyms) * len(templates)`` texts, synonym-major.
        """
        return {
            cls: [t.replace(self.placeholder, syn) for syn in synonyms for t in self.templates]
            for cls, synonyms in self.classes.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form in the native YAML layout (round-trips through :func:`parse_prompts`)."""
        out: dict[str, Any] = {
            "name": self.name,
            "placeholder": self.placeholder,
            "templates": list(self.templates),
            "classes": {c: list(s) for c, s in self.classes.items()},
        }
        if self.top_k:
            out["top_k"] = list(self.top_k)
        if self.context is not None:
            out["context"] = self.context
        return out

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of the canonical content (order-sensitive; comments and formatting do not count)."""
        canon = {"format": HASH_FORMAT, **self.to_dict()}
        canon["classes"] = [[c, list(s)] for c, s in self.classes.items()]
        blob = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _validate(p: PromptSet) -> None:
    """Semantic checks for sets built in code (file loading reports the same with positions)."""
    problems = []
    if not isinstance(p.name, str) or not p.name.strip():
        problems.append("name: must be a non-empty string")
    if not isinstance(p.placeholder, str) or not p.placeholder:
        problems.append("placeholder: must be a non-empty string")
    if not p.templates:
        problems.append("templates: is empty; add at least one template")
    for i, t in enumerate(p.templates):
        if not isinstance(t, str) or p.placeholder not in t:
            problems.append(f"templates[{i}]: {t!r} does not contain the placeholder {p.placeholder!r}")
    if len(p.classes) < 2:
        problems.append(f"classes: needs at least 2 classes, got {len(p.classes)}")
    for c, syns in p.classes.items():
        if not syns or not all(isinstance(s, str) and s.strip() for s in syns):
            problems.append(f"classes.{c}: needs a non-empty list of non-empty string synonyms")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in p.top_k):
        problems.append(f"top_k: {list(p.top_k)} must be positive integers")
    if problems:
        raise PromptFileError(f"{p.source or 'prompt set'}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Loading


def load_prompts(path: str | os.PathLike[str]) -> PromptSet:
    """Load and validate one prompt file (YAML, or CONCH/MI-Zero JSON with a single entry).

    Raises
    ------
    PromptFileError
        The file is missing, unparsable, invalid (message: ``file:line:column: field: problem``)
        or holds several prompt sets (use :func:`load_prompt_sets`).
    """
    sets = load_prompt_sets(path)
    if len(sets) != 1:
        raise PromptFileError(
            f"{path}: holds {len(sets)} prompt sets ({', '.join(s.name for s in sets)}); "
            "load it with load_prompt_sets() or keep one entry"
        )
    return sets[0]


def load_prompt_sets(path: str | os.PathLike[str]) -> list[PromptSet]:
    """Load every prompt set of a file (a CONCH/MI-Zero JSON may hold several)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise PromptFileError(f"{path}: {size:,} bytes is too large for a prompt file (at most "
                                  f"{MAX_PROMPT_FILE_BYTES:,} bytes of classes and templates); is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PromptFileError(f"{path}: prompt file not found; check the path") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: cannot read prompt file as UTF-8 text: {e}") from e
    doc: Any = None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
        text = text.replace("\t", " ")  # JSON whitespace; YAML forbids tabs as indentation
    elif text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # a YAML flow mapping, or broken: the YAML parser names the position
    if doc is not None:
        _check_json_shape(doc, str(path))
    return _parse(text, str(path), default_name=path.stem)


def _check_json_shape(doc: Any, source: str) -> None:
    """Refuse a JSON document whose top level is no prompt set (native keys or CONCH/MI-Zero
    ``classnames`` entries) before the YAML parse, which takes minutes on megabytes."""
    if not isinstance(doc, dict):
        raise PromptFileError(f"{source}: <top level>: must be a mapping, got a {type(doc).__name__}")
    conch = "classnames" in doc or (bool(doc) and all(isinstance(v, dict) and "classnames" in v for v in doc.values()))
    unknown = [k for k in doc if k not in _NATIVE_KEYS]
    if conch or not unknown:
        return
    what = f"GeoJSON ({doc['type']})" if doc.get("type") in _GEOJSON_TYPES else "no prompt file"
    raise PromptFileError(f"{source}: {what}: top-level keys {', '.join(map(repr, unknown[:5]))}; a prompt file has "
                          f"{', '.join(_NATIVE_KEYS)} (or CONCH/MI-Zero entries with 'classnames')")


def parse_prompts(text: str, *, source: str = "<string>", default_name: str = "prompts") -> PromptSet:
    """Parse one prompt set from YAML/JSON text (``source`` names it in error messages)."""
    sets = _parse(text, source, default_name=default_name)
    if len(sets) != 1:
        raise PromptFileError(f"{source}: holds {len(sets)} prompt sets; expected one")
    return sets[0]


def save_prompts(prompts: PromptSet, path: str | os.PathLike[str]) -> Path:
    """Write ``prompts`` as a native YAML prompt file, atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(prompts.to_dict(), sort_keys=False, allow_unicode=True))
    return path


def sample_prompt_sets(prompts: PromptSet, n: int, seed: int) -> list[PromptSet]:
    """MI-Zero-style prompt sets: ``n`` copies of ``prompts`` with one random synonym per class.

    All templates are kept. Sampling is independent per class and set (sets may repeat when
    there are few synonyms) and reproducible for a given ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sample_prompt_sets: n must be a positive integer, got {n!r}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        classes = {c: (rng.choice(syns),) for c, syns in prompts.classes.items()}
        out.append(dataclasses.replace(prompts, name=f"{prompts.name}#{i}", classes=classes))
    return out


# --------------------------------------------------------------------------------------------
# Node-level parsing: every value keeps its start_mark so errors can name line:column.


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: Node | None, where: str, problem: str) -> PromptFileError:
        pos = f"{node.start_mark.line + 1}:{node.start_mark.column + 1}: " if node is not None else ""
        return PromptFileError(f"{self.source}:{pos}{where}: {problem}")

    def mapping(self, node: Node, where: str) -> Iterator[tuple[str, Node, Node]]:
        """Yield (key, key node, value node); reject non-mappings, non-string and duplicate keys."""
        if not isinstance(node, MappingNode):
            raise self.error(node, where, f"must be a mapping, got {_kind(node)}")
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR):
                raise self.error(key_node, where, f"key {key_node.value!r} must be a string; quote it")
            key = key_node.value
            if key in seen:
                first = seen[key].start_mark
                raise self.error(
                    key_node, f"{where}.{key}" if where else key,
                    f"duplicate key (first defined at line {first.line + 1}:{first.column + 1}); "
                    "keep one and merge the entries",
                )
            seen[key] = key_node
            yield key, key_node, value_node

    def string(self, node: Node, where: str) -> str:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            raise self.error(node, where, f"must be a string, got {_kind(node)}; quote it")
        if not node.value.strip():
            raise self.error(node, where, "must not be empty")
        return node.value

    def string_list(self, node: Node, where: str) -> list[tuple[str, Node]]:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            raise self.error(node, where, "is empty; add at least one entry")
        if not isinstance(node, SequenceNode):
            raise self.error(node, where, f"must be a list of strings, got {_kind(node)}")
        if not node.value:
            raise self.error(node, where, "is empty; add at least one entry")
        items, seen = [], set()
        for i, item in enumerate(node.value):
            s = self.string(item, f"{where}[{i}]")
            if s in seen:
                raise self.error(item, f"{where}[{i}]", f"duplicate entry {s!r}; remove it")
            seen.add(s)
            items.append((s, item))
        return items

    def positive_int(self, node: Node, where: str) -> int:
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            raise self.error(node, where, f"must be a positive integer, got {_kind(node)}")
        value = SafeConstructor().construct_yaml_int(node)
        if value < 1:
            raise self.error(node, where, f"must be a positive integer, got {value}")
        return int(value)

    def top_k(self, node: Node) -> tuple[int, ...]:
        if isinstance(node, SequenceNode):
            if not node.value:
                raise self.error(node, "top_k", "is empty; give an integer or a list of integers")
            ks = [self.positive_int(n, f"top_k[{i}]") for i, n in enumerate(node.value)]
            for i, k in enumerate(ks):
                if k in ks[:i]:
                    raise self.error(node.value[i], f"top_k[{i}]", f"duplicate K {k}; remove it")
            return tuple(ks)
        return (self.positive_int(node, "top_k"),)

    def templates(self, node: Node, placeholder: str) -> tuple[str, ...]:
        items = self.string_list(node, "templates")
        for i, (t, item) in enumerate(items):
            if placeholder not in t:
                raise self.error(
                    item, f"templates[{i}]",
                    f"{t!r} does not contain the placeholder {placeholder!r}; "
                    "write it where the class name goes",
                )
        return tuple(t for t, _ in items)

    def classes(self, node: Node, where: str, placeholder: str, single_ok: bool) -> dict[str, tuple[str, ...]]:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            raise self.error(node, where, "is empty; add at least two classes with synonyms")
        out: dict[str, tuple[str, ...]] = {}
        by_synonyms: dict[frozenset[str], str] = {}  # identical prompts: the two classes always tie
        for cls, key_node, value in self.mapping(node, where):
            if not cls.strip():
                raise self.error(key_node, where, "class name must not be empty")
            if single_ok and isinstance(value, ScalarNode) and value.tag == _STR:
                synonyms = [(self.string(value, f"{where}.{cls}"), value)]
            else:
                synonyms = self.string_list(value, f"{where}.{cls}")
            for i, (s, item) in enumerate(synonyms):
                if placeholder in s:
                    raise self.error(item, f"{where}.{cls}[{i}]", f"synonym contains the placeholder {placeholder!r}")
            out[cls] = tuple(s for s, _ in synonyms)
            same = by_synonyms.setdefault(frozenset(out[cls]), cls)
            if same != cls:
                raise self.error(key_node, f"{where}.{cls}",
                                 f"same synonyms as class {same!r}: the two classes get identical prompts and "
                                 "always tie; merge them or give each its own synonyms")
        if len(out) < 2:
            raise self.error(node, where, f"needs at least 2 classes, got {len(out)}")
        return out

    def native(self, root: Node) -> PromptSet:
        fields: dict[str, tuple[Node, Node]] = {}
        for key, key_node, value in self.mapping(root, ""):
            if key not in _NATIVE_KEYS:
                raise self.error(key_node, key, f"unknown key; allowed keys are {', '.join(_NATIVE_KEYS)}")
            fields[key] = (key_node, value)
        for required in ("name", "templates", "classes"):
            if required not in fields:
                raise self.error(root, required, "missing required key")
        placeholder = (
            self.string(fields["placeholder"][1], "placeholder") if "placeholder" in fields else DEFAULT_PLACEHOLDER
        )
        return PromptSet(
            name=self.string(fields["name"][1], "name"),
            templates=self.templates(fields["templates"][1], placeholder),
            classes=self.classes(fields["classes"][1], "classes", placeholder, single_ok=False),
            placeholder=placeholder,
            top_k=self.top_k(fields["top_k"][1]) if "top_k" in fields else (),
            context=self.string(fields["context"][1], "context") if "context" in fields else None,
            source=self.source,
        )

    def conch_entry(self, node: Node, where: str, name: str) -> PromptSet:
        fields: dict[str, Node] = {}
        for key, key_node, value in self.mapping(node, where):
            if key not in _CONCH_KEYS:
                raise self.error(key_node, _join(where, key), f"unknown key; allowed keys are {', '.join(_CONCH_KEYS)}")
            fields[key] = value
        for required in _CONCH_KEYS:
            if required not in fields:
                raise self.error(node, _join(where, required), "missing required key")
        return PromptSet(
            name=name,
            templates=self.templates(fields["templates"], DEFAULT_PLACEHOLDER),
            classes=self.classes(fields["classnames"], _join(where, "classnames"), DEFAULT_PLACEHOLDER, single_ok=True),
            source=self.source,
        )


def _parse(text: str, source: str, default_name: str) -> list[PromptSet]:
    parser = _Parser(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
        raise PromptFileError(f"{source}:{pos}not valid YAML/JSON: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise PromptFileError(f"{source}: not valid YAML/JSON: {e}") from e
    if root is None:
        raise PromptFileError(f"{source}: prompt file is empty; see configs/prompts/ for examples")
    if not isinstance(root, MappingNode):
        raise parser.error(root, "<top level>", f"must be a mapping, got {_kind(root)}")
    keys = [k.value for k, _ in root.value]
    if "classnames" in keys:  # a single CONCH entry without its id wrapper
        return [parser.conch_entry(root, "", default_name)]
    if root.value and all(_has_key(v, "classnames") for _, v in root.value):
        entries = list(parser.mapping(root, ""))
        single = len(entries) == 1
        return [parser.conch_entry(v, k, default_name if single else f"{default_name}[{k}]") for k, _, v in entries]
    return [parser.native(root)]


def _has_key(node: Node, key: str) -> bool:
    return isinstance(node, MappingNode) and any(getattr(k, "value", None) == key for k, _ in node.value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = node.tag.rsplit(":", 1)[-1]
    return "nothing" if kind == "null" else f"{kind} {node.value!r}"


__all__ = [
    "DEFAULT_PLACEHOLDER",
    "PromptSet",
    "load_prompt_sets",
    "load_prompts",
    "parse_prompts",
    "sample_prompt_sets",
    "save_prompts",
]
