"""User-supplied CSV and text files: one reader, and a one-line ConfigError for every file problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.classify.metrics import load_labels
from wsi_pipeline.config import load_mpp_csv, load_yaml_options
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.inputs import collect_inputs
from wsi_pipeline.train.data import load_roi_table
from wsi_pipeline.userfiles import read_csv_table, read_text

LATIN1 = "slide_id,label\nglandular_1,glandul\xe9r\n".encode("latin-1")


def _write(tmp_path: Path, data: bytes | str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def test_header_case_bom_extra_columns_blank_rows_and_line_numbers(tmp_path: Path) -> None:
    text = '\ufeff Label ,Note,SLIDE_ID\nA,"two\nlines",s1\n,,\n\nB,x,s2\nC\n'
    rows = read_csv_table(_write(tmp_path, text), "labels CSV", ("slide_id", "label"))
    # the quoted two-line cell ends on line 3; ",," and the empty line are skipped; a short row reads as empty
    assert rows == [(3, {"slide_id": "s1", "label": "A"}), (6, {"slide_id": "s2", "label": "B"}),
                    (7, {"slide_id": "", "label": "C"})]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (LATIN1, "is not UTF-8 text (line 2)"),
        ("name,label\na,b\n", "needs a header with columns 'slide_id, label', got name, label"),
        ("", "needs a header with columns 'slide_id, label', got no header"),
        ('slide_id,label\na,"b"c\n', "line 2: not valid CSV"),
        ('slide_id,label\na,b\n"c,d\n', "line 3: not valid CSV (unexpected end of data)"),
    ],
    ids=["latin-1", "wrong-header", "empty-file", "text-after-quote", "unclosed-quote"],
)
def test_file_problems_are_one_line_config_errors(tmp_path: Path, data: bytes | str, fragment: str) -> None:
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        read_csv_table(p, "labels CSV", ("slide_id", "label"))
    assert fragment in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read labels CSV .*nope.csv"):
        read_csv_table(tmp_path / "nope.csv", "labels CSV", ("slide_id",))
    with pytest.raises(ConfigError, match="cannot read slide list"):
        read_text(tmp_path, "slide list")


def test_read_text_drops_bom_and_refuses_other_encodings(tmp_path: Path) -> None:
    assert read_text(_write(tmp_path, "\ufeffa: 1\n", "c.yaml"), "config") == "a: 1\n"
    with pytest.raises(ConfigError, match=r"config .*c2.yaml is not UTF-8 text \(line 2\)"):
        read_text(_write(tmp_path, b"a: 1\nb: \xe9\n", "c2.yaml"), "config")


def test_every_user_file_reader_reports_bad_encoding_in_one_line(tmp_path: Path) -> None:
    """labels, mpp and ROI CSVs, tiling presets and slide lists all go through the same reader."""
    bad = _write(tmp_path, b"slide,mpp,slide_id,label,path\n\xe9,0.5,a,b,c\n", "bad.csv")
    calls = [
        (lambda: load_labels(bad, ["b"]), "labels CSV"),
        (lambda: load_mpp_csv(bad), "mpp CSV"),
        (lambda: load_roi_table(bad), "ROI CSV"),
        (lambda: load_yaml_options(bad), "config"),
        (lambda: collect_inputs([f"@{bad}"]), "slide list"),
    ]
    for call, what in calls:
        with pytest.raises(ConfigError, match=f"^{what} .*bad.csv is not UTF-8 text"):
            call()
