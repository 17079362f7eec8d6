"""``genrec report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page and a Markdown summary.

For each run: the dataset, every stage with its time, summary and resolved config; test
metrics of every model with bootstrap 95% intervals, beside the run's baselines (table and
plot); training and reward curves (SASRec, SFT, RL); Semantic-ID codebook usage. Across
runs: a comparison table (and plot). A part whose files are missing or unreadable is
reported as such ("sft/curves.jsonl not found: run the 'sft' stage") and the rest is still
written. Plots are matplotlib (Agg) PNGs embedded as base64, so the HTML is one file.

Files read, all optional: ``prepare/stats.json``, ``<stage>/done.json``,
``{popularity,sasrec}/eval/metrics.json``, ``eval/metrics.json`` (SFT), ``rl/eval/metrics.json``,
``sasrec/curves.json``, ``sft/curves.jsonl``, ``rl/rl_curves.jsonl``, ``sid/quality.json``,
``sid/codes.npy``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genrec.io import atomic_write_text

# Model name in the report -> (metrics file, the stage that writes it). Baselines first.
MODELS = {
    "popularity": ("popularity/eval/metrics.json", "popularity"),
    "sasrec": ("sasrec/eval/metrics.json", "sasrec"),
    "sft": ("eval/metrics.json", "eval"),
    "sft+rl": ("rl/eval/metrics.json", "rl"),
}
BASELINES = ("popularity", "sasrec")
# Curve source -> (file, the stage that writes it, x axis, title of the left panel).
CURVES = {
    "sasrec": ("sasrec/curves.json", "sasrec", "epoch", "training loss"),
    "sft": ("sft/curves.jsonl", "sft", "epoch", "training loss"),
    "rl": ("rl/rl_curves.jsonl", "rl", "step", "reward"),
}
# Cut-offs shown in the tables (those the run evaluated).
REPORT_KS = (5, 10, 20)


@dataclass
class RunData:
    """Everything the report shows of one run directory; ``missing`` says what could not be read."""

    path: Path
    name: str
    stats: dict | None = None
    stages: dict[str, dict] = field(default_factory=dict)  # stage -> done.json
    metrics: dict[str, dict] = field(default_factory=dict)  # model -> metrics.json
    curves: dict[str, list[dict]] = field(default_factory=dict)  # source -> rows
    sid_quality: dict | None = None
    codes: np.ndarray | None = None
    missing: list[str] = field(default_factory=list)


def _read(run: RunData, rel: str, stage: str, parse):
    """``parse(path)`` of a run file, or None with a note in ``run.missing``."""
    path = run.path / rel
    if not path.is_file():
        run.missing.append(f"{rel} not found: run the '{stage}' stage")
        return None
    try:
        return parse(path)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        run.missing.append(f"{rel} could not be read ({exc}): rerun the '{stage}' stage")
        return None


def _json(path: Path):
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {lineno}: {exc.msg}") from None
    return rows


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read what a run directory holds; never raises for missing or broken parts."""
    from genrec.pipeline import STAGES

    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: give a run directory (the config's run_dir)")
    run = RunData(path=path, name=name or path.name)
    run.stats = _read(run, "prepare/stats.json", "prepare", _json)
    for stage in STAGES:
        done = path / stage / "done.json"
        if done.is_file():
            try:
                run.stages[stage] = _json(done)
            except ValueError as exc:
                run.missing.append(f"{stage}/done.json could not be read ({exc})")
    for model, (rel, stage) in MODELS.items():
        if (metrics := _read(run, rel, stage, _json)) is not None:
            run.metrics[model] = metrics
    for source, (rel, stage, _, _) in CURVES.items():
        rows = _read(run, rel, stage, _json if rel.endswith(".json") else _jsonl)
        if rows:
            run.curves[source] = rows
    run.sid_quality = _read(run, "sid/quality.json", "sid", _json)
    run.codes = _read(run, "sid/codes.npy", "sid", np.load)
    return run


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _metric_ci(metrics: dict, split: str, key: str) -> tuple[float, float, float] | None:
    """(value, low, high) of one metric, the interval collapsed to the value when there is none."""
    part = metrics.get(split, {})
    if key not in part:
        return None
    lo, hi = part.get("ci95", {}).get(key, [part[key], part[key]])
    return float(part[key]), float(lo), float(hi)


def plot_metrics(run: RunData, split: str = "test") -> bytes | None:
    """HR@10 and NDCG@10 of every model with 95% bootstrap intervals; baselines hatched."""
    models = [m for m in MODELS if m in run.metrics and _metric_ci(run.metrics[m], split, "ndcg@10")]
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("hr@10", "ndcg@10")):
        vals = [_metric_ci(run.metrics[m], split, key) for m in models]
        x = np.arange(len(models))
        heights = [v[0] for v in vals]
        err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])  # (2, M): below, above
        bars = ax.bar(
            x, heights, yerr=err, capsize=4, color=["#9aa5b1" if m in BASELINES else "#2b6cb0" for m in models]
        )
        for bar, m in zip(bars, models):
            if m in BASELINES:
                bar.set_hatch("//")
        ax.set_xticks(x, models)
        ax.set_title(f"{split} {key.upper()} (95% CI)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_curves(run: RunData) -> bytes | None:
    """One row per curve source: loss (or reward) and the validation metric, against epoch or step."""
    sources = [s for s in CURVES if s in run.curves]
    if not sources:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(sources), 2, figsize=(10, 3.0 * len(sources)), squeeze=False)
    for row, source in zip(axes, sources):
        _, _, x_key, left_title = CURVES[source]
        rows = [r for r in run.curves[source] if x_key in r]
        keys = sorted({k for r in rows for k in r})
        left = ["loss"] if source != "rl" else [k for k in keys if k.startswith("reward")]
        right = [k for k in keys if k.startswith("valid_") and k.endswith("@10")]
        for ax, names, title in ((row[0], left, left_title), (row[1], right, "validation")):
            for name in names:
                pts = [(r[x_key], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, lw=1.2, label=name)
            ax.set_title(f"{source}: {title}")
            ax.set_xlabel(x_key)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            xs_all = [r[x_key] for r in rows]
            if xs_all and max(xs_all) - min(xs_all) < 2:  # one or two points: keep whole-number ticks
                ax.set_xlim(min(xs_all) - 1, max(xs_all) + 1)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return _png(fig)


def plot_codebook(run: RunData) -> bytes | None:
    """Items per code at each SID level, codes sorted by use: flat is even use, a cliff is dead codes."""
    if run.codes is None or run.codes.ndim != 2:
        return None
    plt = _pyplot()
    codes = run.codes.astype(np.int64)
    sizes = (run.sid_quality or {}).get("codebook_sizes") or (codes.max(axis=0) + 1).tolist()
    levels = codes.shape[1]
    fig, axes = plt.subplots(1, levels, figsize=(3.6 * levels, 3.0), squeeze=False)
    for t, ax in enumerate(axes[0]):
        counts = np.sort(np.bincount(codes[:, t], minlength=sizes[t]))[::-1]
        used = counts[counts > 0]
        p = used / used.sum()
        ax.bar(np.arange(len(counts)), counts, width=1.0, color="#2b6cb0")
        ax.axhline(len(codes) / sizes[t], color="#c05621", lw=1, ls="--", label="even use")
        ax.set_title(
            f"level {t}: {len(used)}/{sizes[t]} codes, perplexity {np.exp(-(p * np.log(p)).sum()):.0f}", fontsize=9
        )
        ax.set_xlabel("code (sorted by use)")
        ax.set_ylabel("items")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_comparison(runs: Sequence[RunData], split: str = "test") -> bytes | None:
    """NDCG@10 with 95% intervals of every (run, model), one horizontal bar each."""
    rows = [
        (f"{r.name} / {m}", _metric_ci(r.metrics[m], split, "ndcg@10"), m)
        for r in runs
        for m in MODELS
        if m in r.metrics and _metric_ci(r.metrics[m], split, "ndcg@10")
    ]
    if len(runs) < 2 or not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    vals = [v for _, v, _ in rows]
    err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])
    ax.barh(
        y,
        [v[0] for v in vals],
        xerr=err,
        capsize=3,
        color=["#9aa5b1" if m in BASELINES else "#2b6cb0" for _, _, m in rows],
    )
    ax.set_yticks(y, [label for label, _, _ in rows], fontsize=8)
    ax.set_title(f"{split} NDCG@10 (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- tables


def _ks(run: RunData) -> list[int]:
    found = {int(k.split("@")[1]) for m in run.metrics.values() for k in m.get("test", {}) if k.startswith("ndcg@")}
    return [k for k in REPORT_KS if k in found] or sorted(found)


def metric_rows(run: RunData, split: str = "test") -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per model) of "value [low, high]" strings."""
    ks = _ks(run)
    header = ["model", "users"] + [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
    rows = []
    for model in MODELS:
        if model not in run.metrics:
            continue
        part = run.metrics[model].get(split, {})
        cells = [model + (" (baseline)" if model in BASELINES else ""), str(part.get("users", "?"))]
        for k in ks:
            for m in ("hr", "ndcg"):
                v = _metric_ci(run.metrics[model], split, f"{m}@{k}")
                cells.append("-" if v is None else f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]")
        rows.append(cells)
    return header, rows


def sid_rows(q: dict) -> tuple[list[str], list[list[str]]]:
    header = ["level", "size", "used", "utilisation", "perplexity"]
    rows = [
        [str(u["level"]), str(u["size"]), str(u["used"]), f"{u['utilisation']:.3f}", f"{u['perplexity']:.1f}"]
        for u in q.get("usage", [])
    ]
    return header, rows


def comparison_rows(runs: Sequence[RunData], split: str = "test") -> tuple[list[str], list[list[str]]]:
    header = ["run", "dataset", "model", "users", "hr@10", "ndcg@10", "ndcg@10 95% CI"]
    rows = []
    for run in runs:
        dataset = _dataset_name(run)
        for model in MODELS:
            if model not in run.metrics:
                continue
            part = run.metrics[model].get(split, {})
            ndcg = _metric_ci(run.metrics[model], split, "ndcg@10")
            rows.append(
                [
                    run.name,
                    dataset,
                    model,
                    str(part.get("users", "?")),
                    f"{part.get('hr@10', float('nan')):.4f}",
                    "-" if ndcg is None else f"{ndcg[0]:.4f}",
                    "-" if ndcg is None else f"[{ndcg[1]:.4f}, {ndcg[2]:.4f}]",
                ]
            )
    return header, rows


def _summary(d: dict, limit: int = 8) -> str:
    items = [
        f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in d.items() if not isinstance(v, (dict, list))
    ]
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _dataset_name(run: RunData) -> str:
    """Short: the prepare stage's data.format and data.name, else the start of stats.json's source."""
    data = run.stages.get("prepare", {}).get("config", {}).get("data", {})
    if data.get("format"):
        return f"{data['format']} {data.get('name', '')}".strip()
    source = (run.stats or {}).get("source", "?")
    return source if len(source) <= 40 else source[:37] + "..."


def _dataset_line(run: RunData) -> str:
    s = run.stats
    if not s:
        return "dataset: unknown (prepare/stats.json missing)"
    return (
        f"{s.get('source', '?')}: {s.get('users', 0):,} users, {s.get('items', 0):,} items, "
        f"{s.get('interactions', 0):,} interactions (mean length {s.get('avg_length', 0):.2f}), "
        f"protocol {s.get('split', {}).get('protocol', '?')}"
    )


# --------------------------------------------------------------------------- rendering

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1a202c; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #2b6cb0; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #cbd5e0; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #cbd5e0; padding: 4px 8px; text-align: left; }
th { background: #edf2f7; } td.num { text-align: right; }
.ci { color: #718096; font-size: 11px; } .missing { color: #9c4221; } .muted { color: #718096; font-size: 13px; }
img { max-width: 100%; } pre { background: #f7fafc; padding: .6em; font-size: 11px; overflow-x: auto; }
details { margin: .2em 0; } summary { cursor: pointer; color: #2b6cb0; }
"""


def _text(value: str) -> str:
    """HTML text content (quotes need no escaping outside attributes)."""
    return html.escape(value, quote=False)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str, tag: str) -> str:
        # Numbers (and intervals) right-aligned, so their digits line up.
        open_tag = f"<{tag} class='num'>" if tag == "td" and re.match(r"^[-\[\d.]", text) else f"<{tag}>"
        if " [" in text:  # "value [low, high]": the interval in small grey type
            value, ci = text.split(" [", 1)
            return f"{open_tag}{_text(value)}<br><span class='ci'>[{_text(ci)}</span></{tag}>"
        return f"{open_tag}{_text(text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p class='muted'>(no data for: {_text(alt)})</p>"
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _run_html(run: RunData) -> str:
    parts = [
        f"<h2>Run {_text(run.name)}</h2>",
        f"<p class='muted'>{_text(str(run.path))}</p>",
        f"<p>{_text(_dataset_line(run))}</p>",
    ]
    parts.append("<h3>Test metrics (full ranking, 95% bootstrap intervals)</h3>")
    if run.metrics:
        parts.append(_html_table(*metric_rows(run)))
        parts.append(_img(plot_metrics(run), "test metrics"))
    else:
        parts.append("<p class='missing'>No evaluated model in this run.</p>")
    parts.append("<h3>Training and reward curves</h3>")
    parts.append(_img(plot_curves(run), "training curves"))
    parts.append("<h3>Semantic-ID codebook usage</h3>")
    if run.sid_quality:
        q = run.sid_quality
        parts.append(
            f"<p>{_text(q.get('quantizer', '?'))}, codebooks {q.get('codebook_sizes')}, collision rate "
            f"before resolution {q.get('collision_rate', float('nan')):.4f}, reconstruction error (relative) "
            f"{q.get('recon_rel', float('nan')):.4f}.</p>"
        )
        parts.append(_html_table(*sid_rows(q)))
    parts.append(_img(plot_codebook(run), "SID codebook usage"))
    parts.append("<h3>Stages</h3>")
    if run.stages:
        rows = [[s, f"{d.get('seconds', 0):.1f}", _summary(d.get("summary", {}))] for s, d in run.stages.items()]
        parts.append(_html_table(["stage", "seconds", "summary"], rows))
        for s, d in run.stages.items():
            cfg = _text(json.dumps(d.get("config", {}), indent=1))
            parts.append(
                f"<details><summary>{_text(s)}: resolved config (seed {d.get('seed', '?')})</summary>"
                f"<pre>{cfg}</pre></details>"
            )
    if run.missing:
        items = "".join(f"<li>{_text(m)}</li>" for m in run.missing)
        parts.append(f"<h3>Missing parts</h3><ul class='missing'>{items}</ul>")
    return "\n".join(parts)


def render_html(runs: Sequence[RunData]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>genrec report</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>genrec report: {_text(', '.join(r.name for r in runs))}</h1>",
    ]
    if len(runs) > 1:
        parts.append("<h2>Comparison across runs (test split)</h2>")
        parts.append(_html_table(*comparison_rows(runs)))
        parts.append(_img(plot_comparison(runs), "comparison"))
    parts.extend(_run_html(run) for run in runs)
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(runs: Sequence[RunData], html_name: str) -> str:
    parts = [f"# genrec report: {', '.join(r.name for r in runs)}", f"Plots and configs: `{html_name}`."]
    if len(runs) > 1:
        parts += ["## Comparison across runs (test split)", _md_table(*comparison_rows(runs))]
    for run in runs:
        parts += [f"## Run {run.name}", _dataset_line(run)]
        if run.metrics:
            parts += ["Test metrics, full ranking, value [95% bootstrap interval]:", _md_table(*metric_rows(run))]
        if run.sid_quality:
            parts += [
                f"SID codebook usage (collision rate before resolution "
                f"{run.sid_quality.get('collision_rate', float('nan')):.4f}):",
                _md_table(*sid_rows(run.sid_quality)),
            ]
        if run.stages:
            rows = [[s, f"{d.get('seconds', 0):.1f}", _summary(d.get("summary", {}))] for s, d in run.stages.items()]
            parts += ["Stages:", _md_table(["stage", "seconds", "summary"], rows)]
        if run.missing:
            parts += ["Missing: " + "; ".join(run.missing) + "."]
    return "\n\n".join(parts) + "\n"


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``out`` (HTML, one file) and the Markdown summary beside it (``.md``); return the HTML path."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    # Runs are named by their directory; when two share a name, by parent/name.
    names = [p.name for p in paths]
    names = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    runs = [load_run(p, name) for p, name in zip(paths, names)]
    out = Path(out)
    if out.suffix.lower() != ".html":
        raise ValueError(f"the report path must end in .html, got {out}")
    atomic_write_text(out, render_html(runs))
    atomic_write_text(out.with_suffix(".md"), render_markdown(runs, out.name))
    return out
