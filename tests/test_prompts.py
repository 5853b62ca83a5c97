"""Prompt files: loading, validation errors with positions, expansion, hashing, sampling."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from wsi_pipeline.classify.prompts import (
    PromptSet,
    load_prompt_sets,
    load_prompts,
    parse_prompts,
    sample_prompt_sets,
    save_prompts,
)
from wsi_pipeline.errors import ConfigError, PromptFileError

PROMPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"

GOOD = textwrap.dedent(
    """\
    name: toy
    templates:
      - "an H&E image of CLASSNAME."
      - "CLASSNAME."
    classes:
      A: [alpha, "alpha tumour"]
      B: [beta]
    top_k: [5, 1]
    context: "an H&E image"
    """
)


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_load_good_file(tmp_path: Path) -> None:
    p = load_prompts(write(tmp_path, GOOD))
    assert p.name == "toy"
    assert p.placeholder == "CLASSNAME"
    assert p.templates == ("an H&E image of CLASSNAME.", "CLASSNAME.")
    assert p.class_names == ("A", "B")
    assert p.classes["A"] == ("alpha", "alpha tumour")
    assert p.top_k == (5, 1)
    assert p.context == "an H&E image"
    assert p.source == str(tmp_path / "p.yaml")


def test_class_order_is_file_order(tmp_path: Path) -> None:
    p = parse_prompts("name: t\ntemplates: [x CLASSNAME]\nclasses:\n  zeta: [z]\n  alpha: [a]\n  mid: [m]\n")
    assert p.class_names == ("zeta", "alpha", "mid")


def test_expand_fills_every_template_with_every_synonym(tmp_path: Path) -> None:
    p = parse_prompts(GOOD)
    texts = p.expand()
    assert texts == {
        "A": ["an H&E image of alpha.", "alpha.", "an H&E image of alpha tumour.", "alpha tumour."],
        "B": ["an H&E image of beta.", "beta."],
    }


def test_custom_placeholder_replaces_every_occurrence() -> None:
    p = parse_prompts("name: t\nplaceholder: '{c}'\ntemplates: ['{c} or {c}?']\nclasses: {A: [a], B: [b]}\n")
    assert p.expand() == {"A": ["a or a?"], "B": ["b or b?"]}


def test_top_k_scalar() -> None:
    assert parse_prompts(GOOD.replace("top_k: [5, 1]", "top_k: 50")).top_k == (50,)
    assert parse_prompts(GOOD.replace("top_k: [5, 1]\n", "")).top_k == ()


def test_sha256_is_content_hash() -> None:
    a = parse_prompts(GOOD)
    reformatted = GOOD.replace('"CLASSNAME."', "'CLASSNAME.'") + "# a comment\n"
    assert parse_prompts(reformatted).sha256 == a.sha256
    assert parse_prompts(GOOD.replace("CLASSNAME.\"\n", "CLASSNAME!\"\n")).sha256 != a.sha256
    swapped = GOOD.replace('A: [alpha, "alpha tumour"]\n  B: [beta]', 'B: [beta]\n  A: [alpha, "alpha tumour"]')
    assert parse_prompts(swapped).sha256 != a.sha256  # class order is the output column order
    assert re.fullmatch(r"[0-9a-f]{64}", a.sha256)


def test_save_round_trip(tmp_path: Path) -> None:
    p = parse_prompts(GOOD)
    path = save_prompts(p, tmp_path / "out" / "toy.yaml")
    q = load_prompts(path)
    assert q == p and q.sha256 == p.sha256 and q.to_dict() == p.to_dict()
    assert [f.name for f in path.parent.iterdir()] == ["toy.yaml"]  # no temp file left


# ---- errors: each names the field and line:column ---------------------------------------------

ERROR_CASES = {
    "empty_classes": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n", "classes", 3, "empty"),
    "empty_classes_map": ("name: t\ntemplates: [CLASSNAME]\nclasses: {}\n", "classes", 3, "at least 2"),
    "one_class": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: [a]\n", "classes", 4, "at least 2"),
    "empty_templates": ("name: t\ntemplates: []\nclasses: {A: [a], B: [b]}\n", "templates", 2, "empty"),
    "null_templates": ("name: t\ntemplates:\nclasses: {A: [a], B: [b]}\n", "templates", 2, "empty"),
    "duplicate_class": (
        "name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: [a]\n  B: [b]\n  A: [c]\n",
        "classes.A", 6, "duplicate key (first defined at line 4:3)",
    ),
    "duplicate_top_key": (
        "name: t\ntemplates: [CLASSNAME]\nname: u\nclasses: {A: [a], B: [b]}\n", "name", 3, "duplicate key",
    ),
    "no_placeholder": (
        "name: t\ntemplates:\n  - CLASSNAME.\n  - an image of a tumour.\nclasses: {A: [a], B: [b]}\n",
        "templates[1]", 4, "does not contain the placeholder 'CLASSNAME'",
    ),
    "int_template": ("name: t\ntemplates:\n  - CLASSNAME\n  - 42\nclasses: {A: [a], B: [b]}\n",
                     "templates[1]", 4, "must be a string, got int '42'"),
    "int_synonym": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: [a, 7]\n  B: [b]\n",
                    "classes.A[1]", 4, "must be a string"),
    "bool_synonym": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: [a]\n  B: [yes]\n",
                     "classes.B[0]", 5, "must be a string, got bool"),
    "nested_synonym": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: [[a]]\n  B: [b]\n",
                       "classes.A[0]", 4, "must be a string, got a list"),
    "synonyms_not_list": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: a, b\n  B: [b]\n",
                          "classes.A", 4, "must be a list of strings"),
    "empty_synonyms": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: []\n  B: [b]\n",
                       "classes.A", 4, "empty"),
    "int_class_name": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  1: [a]\n  B: [b]\n",
                       "classes", 4, "key '1' must be a string"),
    "unknown_key": ("name: t\ntemplate: [CLASSNAME]\ntemplates: [CLASSNAME]\nclasses: {A: [a], B: [b]}\n",
                    "template", 2, "unknown key"),
    "missing_name": ("templates: [CLASSNAME]\nclasses: {A: [a], B: [b]}\n", "name", 1, "missing required key"),
    "duplicate_template": ("name: t\ntemplates: [CLASSNAME, x, CLASSNAME]\nclasses: {A: [a], B: [b]}\n",
                           "templates[2]", 2, "duplicate entry"),
    "bad_top_k": ("name: t\ntemplates: [CLASSNAME]\nclasses: {A: [a], B: [b]}\ntop_k: [5, 0]\n",
                  "top_k[1]", 4, "positive integer"),
    "float_top_k": ("name: t\ntemplates: [CLASSNAME]\nclasses: {A: [a], B: [b]}\ntop_k: 2.5\n",
                    "top_k", 4, "positive integer"),
    "empty_context": ("name: t\ntemplates: [CLASSNAME]\nclasses: {A: [a], B: [b]}\ncontext: ''\n",
                      "context", 4, "must not be empty"),
    "top_level_list": ("- name\n- t\n", "<top level>", 1, "must be a mapping"),
    "synonym_with_placeholder": ("name: t\ntemplates: [CLASSNAME]\nclasses:\n  A: [a CLASSNAME]\n  B: [b]\n",
                                 "classes.A[0]", 4, "contains the placeholder"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_prompt_file_errors_name_field_and_line(tmp_path: Path, case: str) -> None:
    text, field, line, problem = ERROR_CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    assert f": {field}: " in msg, msg
    assert problem in msg, msg
    assert "\n" not in msg
    assert isinstance(info.value, ConfigError)


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\ntemplates: [CLASSNAME\nclasses: {A: [a]}\n")
    with pytest.raises(PromptFileError, match=rf"^{re.escape(str(path))}:\d+:\d+: not valid YAML/JSON"):
        load_prompts(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="empty"):
        load_prompts(write(tmp_path, "# only a comment\n"))
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.yaml")


def test_programmatic_prompt_set_is_validated() -> None:
    with pytest.raises(PromptFileError, match=r"templates\[0\]"):
        PromptSet(name="t", templates=("no placeholder",), classes={"A": ("a",), "B": ("b",)})
    with pytest.raises(PromptFileError, match="at least 2 classes"):
        PromptSet(name="t", templates=("CLASSNAME",), classes={"A": ("a",)})


# ---- CONCH / MI-Zero JSON layout ---------------------------------------------------------------


def test_conch_json_layout(tmp_path: Path) -> None:
    data = {"0": {"classnames": {"LUAD": ["adenocarcinoma", "lung adenocarcinoma"], "LUSC": ["squamous"]},
                  "templates": ["CLASSNAME.", "an H&E image of CLASSNAME."]}}
    path = tmp_path / "nsclc_prompts.json"
    path.write_text(json.dumps(data, indent="\t"), encoding="utf-8")  # tabs are valid JSON whitespace
    p = load_prompts(path)
    assert p.name == "nsclc_prompts"
    assert p.class_names == ("LUAD", "LUSC")
    assert p.expand()["LUAD"] == ["adenocarcinoma.", "an H&E image of adenocarcinoma.",
                                  "lung adenocarcinoma.", "an H&E image of lung adenocarcinoma."]


def test_mizero_json_single_string_and_several_sets(tmp_path: Path) -> None:
    data = {str(i): {"classnames": {"A": f"a{i}", "B": f"b{i}"}, "templates": ["CLASSNAME."]} for i in range(3)}
    path = tmp_path / "sets.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    sets = load_prompt_sets(path)
    assert [s.name for s in sets] == ["sets[0]", "sets[1]", "sets[2]"]
    assert [s.classes["B"] for s in sets] == [("b0",), ("b1",), ("b2",)]
    with pytest.raises(PromptFileError, match="holds 3 prompt sets"):
        load_prompts(path)


def test_json_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.json"
    dup.write_text('{"0": {"classnames": {"A": ["a"],\n "A": ["b"]}, "templates": ["CLASSNAME"]}}')
    with pytest.raises(PromptFileError, match=r"dup.json:2:2: 0.classnames.A: duplicate key"):
        load_prompts(dup)
    bad = tmp_path / "bad.json"
    bad.write_text('{"0": {"classnames": {"A": ["a"]},,}}')
    with pytest.raises(PromptFileError, match=r"bad.json:1:\d+: invalid JSON"):
        load_prompts(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"0": {"classnames": {"A": "a", "B": "b"}, "templates": ["CLASSNAME"], "x": 1}}')
    with pytest.raises(PromptFileError, match=r"unknown.json:1:\d+: 0.x: unknown key"):
        load_prompts(unknown)


# ---- MI-Zero-style prompt-set sampling ---------------------------------------------------------


def test_sample_prompt_sets() -> None:
    p = parse_prompts(
        "name: t\ntemplates: [CLASSNAME., an image of CLASSNAME.]\n"
        "classes:\n  A: [a1, a2, a3, a4]\n  B: [b1, b2, b3]\n  C: [c1]\n"
    )
    sets = sample_prompt_sets(p, 40, seed=7)
    assert len(sets) == 40
    for s in sets:
        assert s.templates == p.templates and s.class_names == p.class_names
        assert all(len(syns) == 1 and syns[0] in p.classes[c] for c, syns in s.classes.items())
    picked_a = [s.classes["A"][0] for s in sets]
    assert set(picked_a) == {"a1", "a2", "a3", "a4"}  # 40 draws cover all 4 synonyms
    assert [s.sha256 for s in sample_prompt_sets(p, 40, seed=7)] == [s.sha256 for s in sets]
    assert [s.classes["A"] for s in sample_prompt_sets(p, 40, seed=8)] != [s.classes["A"] for s in sets]
    with pytest.raises(ConfigError, match="positive integer"):
        sample_prompt_sets(p, 0, seed=0)


# ---- shipped prompt files ----------------------------------------------------------------------

SHIPPED = {
    "nsclc": ("LUAD", "LUSC"),
    "rcc": ("CCRCC", "PRCC", "CHRCC"),
    "brca": ("IDC", "ILC"),
    "camelyon": ("normal", "tumor"),
    "demo": ("glandular", "solid", "lymphoid"),
    "demo_train": ("glandular", "solid", "lymphoid", "stroma"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_prompt_files(name: str) -> None:
    p = load_prompts(PROMPT_DIR / f"{name}.yaml")
    assert p.name == name
    assert p.class_names == SHIPPED[name]
    assert len(p.templates) >= 10
    assert all(len(s) >= 3 for s in p.classes.values())
    assert all(len(t) == len(p.templates) * len(p.classes[c]) for c, t in p.expand().items())


def test_demo_train_templates_are_held_out() -> None:
    demo = load_prompts(PROMPT_DIR / "demo.yaml")
    train = load_prompts(PROMPT_DIR / "demo_train.yaml")
    assert not set(demo.templates) & set(train.templates)
    assert demo.context and "CLASSNAME" not in demo.context
    assert set(demo.class_names) < set(train.class_names)
