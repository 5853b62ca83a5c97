"""A static HTML report: one self-contained page inside the output folder.

The page links images by *relative* paths (so the output folder can be moved, zipped or
served as is), carries its CSS inline and uses no JavaScript. Every name that reaches the
page (slide ids, class names, reasons) is HTML-escaped and every link is URL-quoted.
Per slide it shows the thumbnail with the tissue contour (from the GeoJSON) drawn over it
as inline SVG, the status, the prediction, a bar per class probability, the heatmap of the
predicted class, links to every class heatmap and the top-patch montage.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..store.atomic import atomic_write_text

_logger = logging.getLogger(__name__)

THUMB_WIDTH = 240  # displayed thumbnail width, px

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}
.meta{color:#555;font-size:13px;margin-bottom:16px}
.meta span{margin-right:18px}
pre.metrics{background:#fff;border:1px solid #ddd;padding:10px;font-size:12px;overflow-x:auto}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #ddd;padding:6px 8px;vertical-align:top;font-size:13px;text-align:left}
th{background:#2f4858;color:#fff;position:sticky;top:0}
tr.failed td{background:#fdecea}
tr.no_tissue td{background:#f4f4f4}
.status{font-weight:600}
.pred{font-size:15px;font-weight:700;color:#1b5e20}
.wrong{color:#b71c1c}
.bar{display:inline-block;width:120px;height:10px;background:#e6e6e6;margin-right:6px;vertical-align:middle}
.bar span{display:block;height:100%;background:#3e7cb1}
.prob{white-space:nowrap;font-family:ui-monospace,monospace;font-size:12px}
svg .contour{fill:rgba(0,160,0,0.08);stroke:#00a000;stroke-width:1.5;fill-rule:evenodd}
img.heat{max-width:260px;display:block;margin-bottom:4px}
.links a{margin-right:8px}
"""


@dataclass
class ReportSlide:
    """What the report shows for one slide; paths are relative to the report's folder."""

    slide_id: str
    status: str
    reason: str = ""
    n_patches: int | None = None
    k: int | None = None
    predicted: str | None = None
    label: str | None = None
    probabilities: Mapping[str, float] = field(default_factory=dict)
    thumbnail: str | None = None
    thumb_size: tuple[int, int] | None = None
    contours: Sequence[Sequence[tuple[float, float]]] = ()
    heatmaps: Mapping[str, str] = field(default_factory=dict)
    montage: str | None = None


def contour_rings(geoms: Iterable[Any], scale: tuple[float, float], tolerance_px: float = 0.75) -> list[list[tuple[float, float]]]:
    """Exterior and hole rings of shapely (multi)polygons in level-0 px, scaled by ``scale``
    (thumbnail px per level-0 px) and simplified to ``tolerance_px`` thumbnail pixels."""
    fx, fy = scale
    tol = tolerance_px / max(min(fx, fy), 1e-12)
    rings = []
    for geom in geoms:
        for part in getattr(geom, "geoms", [geom]):
            part = part.simplify(tol, preserve_topology=True)
            if part.is_empty or not hasattr(part, "exterior"):
                continue
            for ring in (part.exterior, *part.interiors):
                pts = [(round(x * fx, 1), round(y * fy, 1)) for x, y in ring.coords]
                if len(pts) >= 3:
                    rings.append(pts)
    return rings


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(rel: str) -> str:
    return _e(quote(rel.replace(os.sep, "/"), safe="/"))


def _thumb_cell(s: ReportSlide) -> str:
    if not s.thumbnail or not s.thumb_size:
        return "<td>no thumbnail</td>"
    w, h = s.thumb_size
    disp_w = min(THUMB_WIDTH, max(w, 120))
    disp_h = round(disp_w * h / max(w, 1))
    path = " ".join("M" + " L".join(f"{x},{y}" for x, y in ring) + " Z" for ring in s.contours)
    contour = f'<path class="contour" d="{path}"/>' if path else ""
    return (
        f'<td><a href="{_href(s.thumbnail)}"><svg width="{disp_w}" height="{disp_h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="thumbnail of {_e(s.slide_id)}"><image href="{_href(s.thumbnail)}" x="0" y="0" '
        f'width="{w}" height="{h}"/>{contour}</svg></a></td>'
    )


def _prob_cell(s: ReportSlide, class_names: Sequence[str]) -> str:
    if not s.probabilities:
        return "<td>-</td>"
    lines = []
    for c in class_names:
        p = float(s.probabilities.get(c, 0.0))
        lines.append(f'<div class="prob"><span class="bar"><span style="width:{100 * p:.1f}%"></span></span>'
                     f"{p:.3f} {_e(c)}</div>")
    return "<td>" + "".join(lines) + "</td>"


def _visual_cell(s: ReportSlide, class_names: Sequence[str]) -> str:
    parts = []
    if s.predicted and s.predicted in s.heatmaps:
        rel = s.heatmaps[s.predicted]
        parts.append(f'<a href="{_href(rel)}"><img class="heat" src="{_href(rel)}" '
                     f'alt="heatmap of {_e(s.predicted)} on {_e(s.slide_id)}"></a>')
    links = [f'<a href="{_href(s.heatmaps[c])}">{_e(c)}</a>' for c in class_names if c in s.heatmaps]
    if links:
        parts.append('<div class="links">heatmaps: ' + "".join(links) + "</div>")
    if s.montage:
        parts.append(f'<div class="links"><a href="{_href(s.montage)}">top patches of {_e(s.predicted or "")}</a></div>')
    return "<td>" + ("".join(parts) or "-") + "</td>"


def _row(s: ReportSlide, class_names: Sequence[str], show_labels: bool) -> str:
    pred = "-"
    if s.predicted:
        wrong = " wrong" if s.label and s.label != s.predicted else ""
        pred = f'<span class="pred{wrong}">{_e(s.predicted)}</span>'
    status = f'<span class="status">{_e(s.status)}</span>'
    if s.reason:
        status += f"<br><small>{_e(s.reason)}</small>"
    cells = [
        f"<td>{_e(s.slide_id)}</td>",
        _thumb_cell(s),
        f"<td>{status}<br><small>{_e(s.n_patches if s.n_patches is not None else '-')} patches, "
        f"k={_e(s.k if s.k is not None else '-')}</small></td>",
        f"<td>{pred}</td>",
    ]
    if show_labels:
        cells.append(f"<td>{_e(s.label or '-')}</td>")
    cells += [_prob_cell(s, class_names), _visual_cell(s, class_names)]
    return f'<tr class="{_e(s.status)}" id="slide-{_e(s.slide_id)}">' + "".join(cells) + "</tr>"


def render_report(
    title: str,
    class_names: Sequence[str],
    slides: Sequence[ReportSlide],
    *,
    info: Mapping[str, Any] | None = None,
    metrics_text: str | None = None,
) -> str:
    """The report page as an HTML string (``info``: key → value shown under the title)."""
    show_labels = any(s.label for s in slides)
    meta = "".join(f"<span><b>{_e(k)}</b>: {_e(v)}</span>" for k, v in (info or {}).items())
    head = ["slide", "thumbnail &amp; tissue", "status", "prediction"]
    if show_labels:
        head.append("label")
    head += ["probabilities", "heatmap / montage"]
    rows = "\n".join(_row(s, class_names, show_labels) for s in slides)
    metrics = f'<pre class="metrics">{_e(metrics_text)}</pre>' if metrics_text else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n<div class=\"meta\">{meta}</div>\n{metrics}\n"
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>\n"
        f"{rows}\n</tbody></table>\n</body></html>\n"
    )


def write_report(path: str | os.PathLike[str], page: str) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    atomic_write_text(path, page)
    _logger.info("report written to %s", path)
    return path


__all__ = ["ReportSlide", "contour_rings", "render_report", "write_report"]
