"""``evaluation.json`` and a self-contained ``evaluation.html`` for :mod:`medisyn.evaluation`.

The HTML needs nothing but the file: images inline (base64 PNG grids: generated images
beside real training images of the same label, where the real images are available),
metrics as tables with the real-data floor next to each value, and inline SVG bar plots
of the key ratios.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medisyn.config import describe_interval

# (key, column title, pairs with: floor | another metric key, number format)
SUMMARY_COLUMNS: list[tuple[str, str, str | None, str]] = [
    ("type_recognised", "type recognised", "floor", "{:.2f}"),
    ("label_alignment", "label alignment", "real_balanced_accuracy", "{:.2f}"),
    ("tstr_balanced_accuracy", "TSTR bal. acc.", "real_balanced_accuracy", "{:.2f}"),
    ("augmented_balanced_accuracy", "10% real + synthetic", "real10_balanced_accuracy", "{:.2f}"),
    ("fd", "FD", "floor", "{:.3g}"),
    ("kid", "KID", "floor", "{:.3g}"),
    ("precision", "precision", "floor", "{:.2f}"),
    ("recall", "recall", "floor", "{:.2f}"),
    ("density", "density", "floor", "{:.2f}"),
    ("coverage", "coverage", "floor", "{:.2f}"),
    ("near_duplicate_rate", "near-duplicates", "floor", "{:.2f}"),
]
PAIR_NAMES = {"real_balanced_accuracy": "real", "real10_balanced_accuracy": "10% real", "floor": "floor"}

PLOTS: list[tuple[str, str, str, str]] = [
    # (title, metric, reference key ("floor" or a metric), reference name)
    ("Prompted image type recognised", "type_recognised", "floor", "real held-out (floor)"),
    ("Label alignment vs real balanced accuracy", "label_alignment", "real_balanced_accuracy", "real held-out"),
    ("Train on synthetic, test on real (balanced accuracy)", "tstr_balanced_accuracy", "real_balanced_accuracy",
     "trained on real"),
    ("10% real + synthetic vs 10% real alone", "augmented_balanced_accuracy", "real10_balanced_accuracy",
     "10% real alone"),
    ("Precision (fidelity)", "precision", "floor", "real vs real (floor)"),
    ("Recall (coverage of the real distribution)", "recall", "floor", "real vs real (floor)"),
    ("Coverage", "coverage", "floor", "real vs real (floor)"),
]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, f: str = "{:.3g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _e(v)
    return f.format(v)


def _ref(entry: Mapping[str, Any], key: str, pair: str | None) -> Any:
    if pair is None:
        return None
    if pair == "floor":
        return entry.get("floors", {}).get(key)
    return entry.get("metrics", {}).get(pair)


# --------------------------------------------------------------------------- pictures


def grid_png(images: Sequence[np.ndarray], ncols: int = 8, cell: int = 84) -> str | None:
    """uint8 images (H×W or H×W×C, any size) -> one base64 PNG grid, every image shown at
    ``cell`` px (nearest neighbour), so generated and real images compare at one size."""
    from PIL import Image

    if not images:
        return None
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    pad = 1
    grid = Image.new("RGB", (ncols * (cell + pad), nrows * (cell + pad)), "white")
    for i, a in enumerate(images):
        a = np.asarray(a)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        im = Image.fromarray(a.astype(np.uint8)).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(im, ((i % ncols) * (cell + pad), (i // ncols) * (cell + pad)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def svg_bars(title: str, rows: Sequence[tuple[str, Any, Any]], *, ref_name: str, vmax: float = 1.0,
             width: int = 560) -> str:
    """Horizontal bars, one pair per row: the value (orange) and its reference (blue)."""
    bar, gap, left, top = 11, 8, 190, 30
    plot_w = width - left - 60
    height = top + len(rows) * (2 * bar + gap) + 28
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{_e(title)}</text>']
    for i, (name, v, ref) in enumerate(rows):
        y = top + i * (2 * bar + gap)
        parts.append(f'<text x="{left - 6}" y="{y + bar + 3}" font-size="11" text-anchor="end">'
                     f'{_e(name[:32])}</text>')
        for j, (val, col) in enumerate(((v, "#eb8c28"), (ref, "#4670c8"))):
            yy = y + j * bar
            if val is None:
                parts.append(f'<text x="{left + 2}" y="{yy + bar - 2}" font-size="10" fill="#888">n/a</text>')
                continue
            w = max(0.0, min(float(val) / vmax, 1.0)) * plot_w
            parts.append(f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="{bar - 1}" fill="{col}"/>')
            parts.append(f'<text x="{left + w + 3:.1f}" y="{yy + bar - 2}" font-size="10">{float(val):.2f}</text>')
    ly = height - 10
    parts.append(f'<rect x="{left}" y="{ly - 9}" width="10" height="10" fill="#eb8c28"/>'
                 f'<text x="{left + 14}" y="{ly}" font-size="11">synthetic</text>'
                 f'<rect x="{left + 90}" y="{ly - 9}" width="10" height="10" fill="#4670c8"/>'
                 f'<text x="{left + 104}" y="{ly}" font-size="11">{_e(ref_name)}</text>')
    parts.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{ly - 14}" stroke="#999"/>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- HTML


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.ref{color:#4670c8;font-size:11px}.skip{color:#a33}
.pair{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}.pair figure{margin:0}
figcaption{font-size:12px;color:#555}.plots{display:flex;flex-wrap:wrap;gap:12px}.warn{color:#a33}
code{background:#f5f5f5;padding:0 3px}
"""


def _cell(entry: Mapping[str, Any], key: str, pair: str | None, f: str) -> str:
    v = entry.get("metrics", {}).get(key)
    r = _ref(entry, key, pair)
    ref = "" if pair is None else f'<br><span class="ref">{PAIR_NAMES.get(pair, pair)} {_fmt(r, f)}</span>'
    return f"<td>{_fmt(v, f)}{_se(entry.get('metrics', {}), key, f)}{ref}</td>"


def _se(metrics: Mapping[str, Any], key: str, f: str) -> str:
    """`` ± se`` where the metric has a standard error (KID: ``kid_se``)."""
    se = metrics.get(f"{key}_se")
    return "" if se is None or metrics.get(key) is None else f" ± {_fmt(se, f)}"


def _summary_table(types: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{_e(t)}</th>" for _, t, _, _ in SUMMARY_COLUMNS)
    rows = []
    for name, e in types.items():
        if e.get("skipped", {}).get("all"):
            rows.append(f'<tr><td class="l">{_e(name)}</td><td class="l skip" colspan="{len(SUMMARY_COLUMNS) + 1}">'
                        f'{_e(e["skipped"]["all"])}</td></tr>')
            continue
        cells = "".join(_cell(e, k, p, f) for k, _, p, f in SUMMARY_COLUMNS)
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{_e(e.get("n_synthetic", 0))}</td>{cells}</tr>')
    return (f'<table><tr><th class="l">image type</th><th>synthetic images</th>{head}</tr>'
            + "".join(rows) + "</table>")


def _per_label_table(e: Mapping[str, Any]) -> str:
    cols = [("type_recognised", "type recognised", "{:.2f}"), ("label_recall", "label recall", "{:.2f}"),
            ("fd", "FD", "{:.3g}"), ("kid", "KID", "{:.3g}"), ("precision", "precision", "{:.2f}"),
            ("recall", "recall", "{:.2f}"), ("density", "density", "{:.2f}"), ("coverage", "coverage", "{:.2f}"),
            ("near_duplicate_rate", "near-duplicates", "{:.2f}")]
    head = "".join(f"<th>{_e(t)}</th>" for _, t, _ in cols)
    rows = []
    for lab, pl in e.get("per_label", {}).items():
        cells = []
        for k, _, f in cols:
            pair = None if k == "label_recall" else "floor"
            cells.append(_cell(pl, k, pair, f))
        counts = f'{pl.get("n_synthetic", "–")} / {pl.get("n_train", "–")} / {pl.get("n_holdout", "–")}'
        rows.append(f'<tr><td class="l">{_e(lab or "(no label)")}</td><td>{counts}</td>{"".join(cells)}</tr>')
    return (f'<table><tr><th class="l">label</th><th>synthetic / train / held-out</th>{head}</tr>'
            + "".join(rows) + "</table>")


def _plots(types: Mapping[str, Any]) -> str:
    out = []
    live = {n: e for n, e in types.items() if not e.get("skipped", {}).get("all")}
    for title, key, ref, ref_name in PLOTS:
        rows = [(n, e.get("metrics", {}).get(key), _ref(e, key, ref)) for n, e in live.items()]
        if not any(v is not None for _, v, _ in rows):
            continue
        out.append(svg_bars(title, rows, ref_name=ref_name))
    return f'<div class="plots">{"".join(out)}</div>' if out else ""


def _gallery(name: str, e: Mapping[str, Any], gallery: Mapping[str, Any] | None) -> str:
    g = (gallery or {}).get(name) or {}
    if not g:
        return ""
    out = []
    for lab, item in g.items():
        syn = grid_png(item.get("synthetic", []))
        real = grid_png(item.get("real", []))
        figs = []
        if syn:
            figs.append(f'<figure><img alt="generated" src="data:image/png;base64,{syn}">'
                        f'<figcaption>generated ({len(item.get("synthetic", []))})</figcaption></figure>')
        if real:
            figs.append(f'<figure><img alt="real" src="data:image/png;base64,{real}">'
                        f'<figcaption>real training images ({len(item.get("real", []))})</figcaption></figure>')
        elif syn:
            figs.append(f'<figure><figcaption>{_e(item.get("real_note", "real images stay at their site"))}'
                        "</figcaption></figure>")
        out.append(f'<h4>{_e(lab or "(no label)")}: <code>{_e(item.get("prompt", ""))}</code></h4>'
                   f'<div class="pair">{"".join(figs)}</div>')
    return "".join(out)


def render_html(result: Mapping[str, Any], gallery: Mapping[str, Any] | None = None) -> str:
    """The evaluation as one self-contained HTML page."""
    types = result.get("types", {})
    s = result.get("settings", {})
    t = result.get("timings", {})
    meta_rows = [
        ("model hash", result.get("model_hash")),
        ("seed", result.get("seed")),
        ("generation", f'{s.get("n_per_label")} images per label, {s.get("steps")} {s.get("scheduler")} steps, '
                       f'guidance {s.get("guidance")} {describe_interval(s.get("guidance_interval"))}'),
        ("classifiers", f'small CNN (width {s.get("classifier_width")}), {s.get("classifier_steps")} steps '
                        f'(encoder {s.get("encoder_steps")}), batch {s.get("classifier_batch")} label-balanced, '
                        f'lr {s.get("classifier_lr")}, horizontal flips where [dataset].hflip allows them, '
                        f'seed {result.get("seed")}, CPU'),
        ("evaluation space", f'{s.get("resolution")} px RGB in [-1, 1] (grey repeated to 3 channels)'),
        ("encoder (feature space)", result.get("encoder_description")),
        ("k-NN metrics", f'k = {s.get("k")}; reference: the real held-out images of the type'),
        ("near-duplicates", result.get("near_duplicates")),
    ]
    if result.get("config_hash"):
        meta_rows.insert(1, ("federation config hash", result.get("config_hash")))
    data_rows = "".join(
        f'<tr><td class="l">{_e(d.get("image_type"))}{" @ " + _e(d["site"]) if d.get("site") else ""}</td>'
        f'<td class="l"><code>{_e(", ".join(h[:16] for h in d.get("data_hashes", []) if h))}</code></td>'
        f'<td>{_e(d.get("n_train", "–"))}</td><td>{_e(d.get("n_holdout", "–"))}</td></tr>'
        for d in result.get("datasets", []))
    timing = ", ".join(f"{k.replace('_seconds', '')} {v} s" if k.endswith("_seconds") else f"{k} {v}"
                       for k, v in t.items() if not isinstance(v, dict))
    sections = []
    for name, e in types.items():
        skipped = e.get("skipped", {})
        skip_html = "".join(f'<li class="skip"><b>{_e(k)}</b>: {_e(v)}</li>' for k, v in skipped.items())
        extra = []
        if e.get("site"):
            extra.append(f"site {_e(e['site'])}")
        if e.get("encoder"):
            extra.append(f"encoder: {_e(e['encoder'])}")
        if e.get("recognised_as"):
            extra.append("recognised as: " + ", ".join(f"{_e(k)} {v}" for k, v in e["recognised_as"].items()))
        if e.get("n_real10") is not None:
            extra.append(f"10% real = {e['n_real10']} images")
        sections.append(
            f'<h2>{_e(name)}</h2><p>{_e(e.get("specialty", ""))}; {e.get("n_train", "–")} real training, '
            f'{e.get("n_holdout", "–")} held-out, {e.get("n_synthetic", 0)} synthetic images'
            f'{"; " + "; ".join(extra) if extra else ""}</p>'
            + (f"<ul>{skip_html}</ul>" if skip_html else "")
            + ("" if skipped.get("all") else _per_label_table(e))
            + _gallery(name, e, gallery))
    warn = "".join(f'<li class="warn">{_e(w)}</li>' for w in result.get("warnings", []))
    errs = "".join(f'<li class="warn">site {_e(k)}: {_e(v)}</li>' for k, v in result.get("site_errors", {}).items())
    defs = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in result.get("definitions", {}).items())
    title = "MediSyn federated evaluation" if result.get("kind") == "medisyn-federated-evaluation" \
        else "MediSyn evaluation"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head><body>'
        f"<h1>{title}</h1><p>created {_e(result.get('created', ''))}</p>"
        + "<table>" + "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>' for k, v in meta_rows)
        + "</table>"
        + (f'<p class="l">{_e(result["note"])}</p>' if result.get("note") else "")
        + (f"<h3>Warnings</h3><ul>{warn}</ul>" if warn else "")
        + (f"<h3>Sites that did not evaluate</h3><ul>{errs}</ul>" if errs else "")
        + "<h2>Summary</h2><p>Each value with its reference below it: the real-data floor, or the "
          "classifier trained on real images.</p>" + _summary_table(types) + _plots(types)
        + "".join(sections)
        + f'<h3>Data</h3><table><tr><th class="l">image type</th><th class="l">data sha256 (first 16)</th>'
          f"<th>train</th><th>held-out</th></tr>{data_rows}</table>"
        + f"<h3>Timings</h3><p>{_e(timing)}</p>"
        + f"<h3>Definitions</h3><ul>{defs}</ul></body></html>"
    )


def write_evaluation(result: Mapping[str, Any], out_dir: Path,
                     gallery: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/evaluation.json`` and ``out_dir/evaluation.html`` (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "evaluation.json", out_dir / "evaluation.html")
    for p, text in zip(paths, (json.dumps(result, indent=2, allow_nan=False), render_html(result, gallery)),
                       strict=True):
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    return paths


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per image type (the CLI and the demo print these)."""
    out = []
    for name, e in result.get("types", {}).items():
        if e.get("skipped", {}).get("all"):
            out.append(f"{name}: skipped: {e['skipped']['all']}")
            continue
        m, f = e.get("metrics", {}), e.get("floors", {})
        parts = []
        if m.get("type_recognised") is not None:
            parts.append(f"type {_fmt(m['type_recognised'], '{:.2f}')} (real {_fmt(f.get('type_recognised'), '{:.2f}')})")
        if m.get("label_alignment") is not None:
            parts.append(f"label {_fmt(m['label_alignment'], '{:.2f}')} (real {_fmt(m.get('real_balanced_accuracy'), '{:.2f}')})")
        if m.get("tstr_balanced_accuracy") is not None:
            parts.append(f"TSTR {_fmt(m['tstr_balanced_accuracy'], '{:.2f}')}")
        for k in ("precision", "recall", "fd"):
            if m.get(k) is not None:
                parts.append(f"{k} {_fmt(m[k], '{:.2f}' if k != 'fd' else '{:.3g}')} (floor {_fmt(f.get(k), '{:.2f}' if k != 'fd' else '{:.3g}')})")
        if m.get("kid") is not None:
            parts.append(f"KID {_fmt(m['kid'])}{_se(m, 'kid', '{:.2g}')} (floor {_fmt(f.get('kid'))})")
        if m.get("near_duplicate_rate") is not None:
            parts.append(f"near-dup {_fmt(m['near_duplicate_rate'], '{:.2f}')}")
        out.append(f"{name}: " + ", ".join(parts) if parts else f"{name}: no metrics")
    return out
