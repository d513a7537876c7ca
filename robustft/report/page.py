"""Assemble ``results/report/``: one self-contained ``index.html`` (Vega inlined, no network), every chart as PNG
and Vega-Lite JSON beside it, and the leaderboard as text and CSV."""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import pandas as pd

from robustft.io.atomic import atomic_path
from robustft.io.tables import read_table
from robustft.report import CHART_NAMES, LEADERBOARD_FILES
from robustft.report import analyses as A
from robustft.report import charts as C

_RUN_PATH = re.compile(r"(?:^|/)runs/(?P<method>[^/]+)/(?P<variant>[^/]+)/seed(?P<seed>\d+)/[^/]+$")

CAPTIONS = {
    "id_vs_ood": (
        "ID vs OOD accuracy",
        "Each method's WiSE-FT path: weights interpolated linearly between the reference model (α = 0) and the "
        "fine-tuned model (α = 1), evaluated on the ID test split (x) and on each OOD domain and their average (y). "
        "Points up and to the right are better; a path bulging above the straight line between its endpoints means "
        "interpolation buys robustness. Seed means; no logit calibration. Click a method in the legend to "
        "highlight it; hover a point for its numbers.",
    ),
    "accuracy_change": (
        "Change from the reference model",
        "Test accuracy of each fine-tuned model (α = 1, no calibration, seed mean) minus the reference model's, in "
        "accuracy points, per domain.",
    ),
    "calibration": (
        "Calibration for absent classes",
        "Runs fine-tuned without some classes (class-subset protocol): a logit offset γ added to the absent classes "
        "trades seen-class for absent-class accuracy. ALG picks γ from the average logit gap, PCV by pseudo-absent "
        "cross-validation.",
    ),
    "per_class_damage": (
        "Per-class damage",
        "Each class's test accuracy at the α chosen on ID validation minus the reference model's (α = 0), per "
        "domain, in accuracy points (seed mean, no calibration; the table per-class.parquet holds α = 1 as well). "
        "An average gain can hide classes a method destroyed; the table below names the class each method damaged "
        "most in each domain.",
    ),
    "training_curves": (
        "Training curves",
        "Per-step loss (total and each term of the method's objective) and ID validation accuracy at epoch ends, one "
        "line per run. Click a method in the legend to highlight it.",
    ),
}

_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1500px; padding: 1.2em 2em 4em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.3em; margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.meta, p.files { color: #666; font-size: 0.9em; }
p.caption { max-width: 62em; }
p.note { background: #f6f6f6; border-left: 4px solid #bbb; padding: 0.6em 1em; max-width: 62em; }
dl.config { display: grid; grid-template-columns: max-content auto; gap: 0.25em 1.2em; font-size: 0.95em; }
dl.config dt { font-weight: bold; color: #444; }
dl.config dd { margin: 0; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
table.leaderboard { border-collapse: collapse; font-size: 0.9em; font-variant-numeric: tabular-nums; }
table.leaderboard th, table.leaderboard td { padding: 0.3em 0.7em; border-bottom: 1px solid #e4e4e4; }
table.leaderboard th { background: #f4f4f4; text-align: center; position: sticky; top: 0; }
table.leaderboard td.num { text-align: right; }
table.leaderboard tr.reference td { background: #fafafa; font-style: italic; }
table.leaderboard tr.first td { border-top: 1px solid #bbb; }
table.leaderboard tr.oracle td { color: #777; font-style: italic; }
div.table { overflow-x: auto; max-width: 100%; }
h3 { font-size: 1.08em; margin-top: 1.6em; }
span.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.4em; }
div.chart { margin: 0.8em 0; overflow-x: auto; }
div.chart[data-status="error"] { color: #b00; }
"""

_EMBED_SCRIPT = """
(function () {
  const options = {renderer: "svg", actions: {export: true, source: true, compiled: false, editor: false}};
  const jobs = Array.from(document.querySelectorAll("div.chart[data-chart]")).map(function (el) {
    const spec = JSON.parse(document.getElementById("spec-" + el.dataset.chart).textContent);
    return vegaEmbed(el, spec, options).then(function (result) {
      el.dataset.status = "rendered";
      return result;
    }).catch(function (error) {
      el.dataset.status = "error";
      el.dataset.error = String(error);
      el.insertAdjacentText("beforeend", "Chart failed to render: " + error);
    });
  });
  window.robustftCharts = Promise.all(jobs).then(function () { document.body.dataset.charts = "done"; });
})();
"""


# -------------------------------------------------------------------------------------------------------- inputs
def run_identity(path: str | Path) -> dict[str, Any]:
    """``method``, ``variant`` and ``seed`` from a path ``.../runs/{method}/{variant}/seed{seed}/<file>``."""
    match = _RUN_PATH.search(Path(path).as_posix())
    if not match:
        raise ValueError(f"{path}: not inside results/runs/<method>/<variant>/seed<seed>/")
    return {"method": match["method"], "variant": match["variant"], "seed": int(match["seed"])}


def _studies_for(paths: Sequence[str | Path], studies: Sequence[str] | None) -> list[str | None]:
    if studies is None:
        return [None] * len(paths)
    if len(studies) != len(paths):
        raise ValueError(f"report: {len(studies)} run studies for {len(paths)} run files; one study per run expected")
    return list(studies)


def load_curves(paths: Sequence[str | Path], studies: Sequence[str] | None = None) -> pd.DataFrame:
    """Every run's calibration curve in one table (runs without absent classes contribute no rows); ``studies[i]``,
    when given, is the study of ``paths[i]`` (a ``study`` column)."""
    frames = []
    for path, study in zip(paths, _studies_for(paths, studies)):
        frame = read_table(path)
        if len(frame):
            frames.append(frame if study is None else frame.assign(study=study))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_train_logs(paths: Sequence[str | Path], studies: Sequence[str] | None = None) -> pd.DataFrame:
    """Every run's per-step train log in one table, with ``method``, ``variant``, ``seed`` from the run's folder
    (and ``study`` from ``studies[i]`` when given)."""
    frames = []
    for path, study in zip(paths, _studies_for(paths, studies)):
        frame = read_table(path)
        if len(frame) and "step" in frame:
            frame = frame.assign(**run_identity(path))
            frames.append(frame if study is None else frame.assign(study=study))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_per_class(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The per-class tables of the studies (robustft.per_class), one frame."""
    from robustft.per_class import PER_CLASS_COLUMNS

    frames = [read_table(p, PER_CLASS_COLUMNS) for p in paths]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PER_CLASS_COLUMNS)


def _most_damaged_table(per_class: pd.DataFrame | None) -> str:
    """The class each method (variant) damaged most per domain at its chosen alpha, as an HTML table."""
    from robustft.per_class import most_damaged

    if per_class is None or per_class.empty:
        return ""
    worst = most_damaged(per_class)
    if worst.empty:
        return "<p class=\"note\">No class lost accuracy at the chosen α.</p>"
    several = worst["study"].nunique() > 1
    shown = pd.DataFrame({
        **({"study": worst["study"]} if several else {}),
        "method": worst["method"], "variant": worst["variant"], "domain": worst["eval_domain"],
        "class": worst["class_name"], "reference (%)": (100 * worst["reference_accuracy"]).map("{:.1f}".format),
        "chosen α (%)": (100 * worst["accuracy"]).map("{:.1f}".format),
        "Δ (points)": (100 * worst["delta"]).map("{:+.1f}".format)})
    return ("<h3>The class each method damaged most</h3>"
            + _html_table(shown, worst, text_cols=("study", "method", "variant", "domain", "class"),
                          css="leaderboard per-class"))


# -------------------------------------------------------------------------------------------------------- charts
def build_charts(summary: pd.DataFrame, curves: pd.DataFrame | None = None, logs: pd.DataFrame | None = None,
                 ood_domains: Sequence[str] | None = None,
                 analyses: Mapping[str, pd.DataFrame] | None = None,
                 per_class: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every chart of the report, by name (the names in ``CHART_NAMES``); ``analyses``: the tables of
    :func:`robustft.report.analyses.load_analyses`; ``per_class``: the per-class tables (robustft.per_class) of the
    studies."""
    methods = summary["method"].unique()
    return {
        "id_vs_ood": C.id_vs_ood_chart(summary, ood_domains),
        "accuracy_change": C.accuracy_change_chart(summary, ood_domains),
        "calibration": C.calibration_chart(summary, curves if curves is not None else pd.DataFrame(), ood_domains),
        "training_curves": C.training_curves_chart(logs if logs is not None else pd.DataFrame(), methods),
        "per_class_damage": C.per_class_damage_chart(per_class),
        "effective_robustness": A.effective_robustness_chart((analyses or {}).get("effective_robustness")),
    }


def report_files(out_dir: str | Path = "results/report") -> list[str]:
    """Every file :func:`write_report` writes, ``index.html`` first (the outputs the Snakemake rule declares)."""
    out = Path(out_dir)
    files = [out / "index.html"]
    for name in CHART_NAMES:
        files += [out / f"{name}.png", out / f"{name}.vl.json"]
    return [str(f) for f in files + [out / f for f in LEADERBOARD_FILES]]


def write_report(
    summary_path: str | Path,
    curve_paths: Sequence[str | Path] = (),
    train_log_paths: Sequence[str | Path] = (),
    config: Mapping[str, Any] | None = None,
    out_dir: str | Path = "results/report",
    png_scale: float = 2.0,
    run_studies: Sequence[str] | None = None,
    analysis_paths: Mapping[str, str | Path] | None = None,
    per_class_paths: Sequence[str | Path] = (),
) -> dict[str, Path]:
    """Write ``index.html``, ``<chart>.png`` and ``<chart>.vl.json`` per chart, and ``leaderboard.{txt,csv}``.

    ``run_studies[i]`` is the study of ``curve_paths[i]`` and ``train_log_paths[i]`` (the same runs, in the same
    order); it may be left out when the summary holds one study. ``analysis_paths``: the tables of
    rules/analyses.smk by name (:data:`robustft.report.analyses.ANALYSIS_TABLES`), each shown in its own section.
    ``per_class_paths``: each study's per-class table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    summary = read_table(summary_path, ("method", "variant", "seed", "eval_domain", "alpha", "accuracy"))
    studies = C.studies_of(summary)
    if run_studies is None and len(studies) > 1:
        raise ValueError(f"report: the summary holds {len(studies)} studies; pass run_studies (the study of each run)")
    if run_studies is None and "study" in summary:
        run_studies = [studies[0]] * max(len(curve_paths), len(train_log_paths))
    curves = load_curves(curve_paths, None if run_studies is None else run_studies[: len(curve_paths)])
    logs = load_train_logs(train_log_paths, None if run_studies is None else run_studies[: len(train_log_paths)])
    ood = ((config.get("dataset") or {}).get("ood_domains")) or None
    analyses = A.load_analyses(analysis_paths)
    per_class = load_per_class(per_class_paths)
    charts = build_charts(summary, curves, logs, ood, analyses, per_class)
    tables = C.leaderboards(summary, ood)
    written: dict[str, Path] = {}
    specs = {}
    for name, chart in charts.items():
        specs[name] = chart.to_dict()
        written[f"{name}.vl.json"] = _write_text(out / f"{name}.vl.json", json.dumps(specs[name], indent=1))
        with atomic_path(out / f"{name}.png") as tmp:
            chart.save(str(tmp), format="png", scale_factor=png_scale)
        written[f"{name}.png"] = out / f"{name}.png"
    written["leaderboard.txt"] = _write_text(out / "leaderboard.txt", C.leaderboards_text(summary, ood))
    flat = pd.concat([t.assign(study=study) for study, t in tables.items()], ignore_index=True)
    flat = flat[["study", *[c for c in flat.columns if c != "study"]]]
    flat.attrs = {}
    written["leaderboard.csv"] = _write_text(out / "leaderboard.csv", flat.to_csv(index=False))
    page = render_page(specs, tables, summary, curves, config, analyses, per_class)
    written["index.html"] = _write_text(out / "index.html", page)
    return written


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------- page
def render_page(specs: Mapping[str, dict], tables: Mapping[str, pd.DataFrame] | pd.DataFrame, summary: pd.DataFrame,
                curves: pd.DataFrame | None, config: Mapping[str, Any],
                analyses: Mapping[str, pd.DataFrame] | None = None, per_class: pd.DataFrame | None = None) -> str:
    """The HTML page: configuration, every chart (Vega-Lite specs embedded, Vega inlined) and the leaderboards (one
    per study, and across backbones per dataset where a dataset has several)."""
    if isinstance(tables, pd.DataFrame):
        tables = {C.studies_of(summary)[0]: tables}
    title = ((config.get("report") or {}).get("title")) or "robustft report"
    runs = summary[[c for c in ("study", "method", "variant", "seed") if c in summary]].drop_duplicates()
    sections = [f"<header><h1>{_e(title)}</h1><p class=\"meta\">Generated {_dt.datetime.now():%Y-%m-%d %H:%M} "
                f"from <code>results/summary.parquet</code> ({len(summary)} rows, {len(runs)} runs"
                + (f", {len(tables)} studies" if len(tables) > 1 else "") + ").</p></header>",
                _config_section(config, summary)]
    order = ["id_vs_ood", "leaderboard", "accuracy_change", "per_class_damage", "calibration", "training_curves"]
    order = [name for name in order if name in specs or name == "leaderboard"]
    number = 0
    for name in order:
        number += 1
        if name == "leaderboard":
            sections.append(_leaderboard_section(number, tables, summary, (analyses or {}).get("paired_tests")))
            continue
        heading, caption = CAPTIONS[name]
        if name == "id_vs_ood":
            caption += " " + reference_sentence(config, summary)
        body = f"<p class=\"caption\">{_e(caption)}</p>"
        if name == "calibration" and not C.has_absent_classes(summary, curves):
            body = ("<p class=\"note\">No run in this configuration fine-tunes without some classes (class-subset "
                    "protocol), so there is nothing to calibrate.</p>")
        else:
            body += (f"<div class=\"chart\" id=\"chart-{name}\" data-chart=\"{name}\" data-status=\"pending\"></div>"
                     f"<p class=\"files\">Files: <a href=\"{name}.png\">{name}.png</a> · "
                     f"<a href=\"{name}.vl.json\">{name}.vl.json</a> (Vega-Lite)</p>")
        if name == "per_class_damage":
            body += _most_damaged_table(per_class)
        sections.append(f"<section id=\"{name}\"><h2>{number}. {_e(heading)}</h2>{body}</section>")
    sections += A.analysis_sections(number + 1, analyses or {})
    spec_tags = "\n".join(f"<script type=\"application/json\" id=\"spec-{name}\">{_json_for_script(spec)}</script>"
                          for name, spec in specs.items())
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{_e(title)}</title>\n"
            f"<style>{_STYLE}</style>\n<script>\n{vega_bundle()}\n</script>\n</head>\n<body>\n"
            + "\n".join(sections) + f"\n{spec_tags}\n<script>{_EMBED_SCRIPT}</script>\n</body>\n</html>\n")


def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script (from vl-convert, offline), safe inside a ``<script>`` tag."""
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    return vl_convert.javascript_bundle(vl_version=vl_version_for_vl_convert()).replace("</script", "<\\/script")


def _json_for_script(spec: dict) -> str:
    return json.dumps(spec, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _is_clip(backbone: str) -> bool:
    return "clip" in str(backbone).lower()


def reference_sentence(config: Mapping[str, Any], summary: pd.DataFrame) -> str:
    """What the reference model (α = 0, method ``zeroshot``) is for the backbones of this report."""
    names = {(config.get("backbone") or {}).get("name")} - {None}
    if not names and "backbone" in summary:
        names = set(map(str, summary["backbone"].unique()))
    clip, other = any(_is_clip(n) for n in names), any(not _is_clip(n) for n in names)
    zero_shot = ("zero-shot CLIP: the pre-trained image encoder with a head built from the text embeddings of "
                 "class-name prompts")
    probe = "a linear probe: a classifier head trained on frozen pre-trained features of the ID training split"
    if clip and other:
        return f"The reference model is {zero_shot} for CLIP backbones, and {probe} for the others (no zero-shot head)."
    if clip:
        return f"The reference model is {zero_shot}."
    return f"The reference model is {probe} (this backbone has no zero-shot head)."


def backbone_description(spec: Mapping[str, Any]) -> str:
    """A backbone spec in words, with only the keys its kind uses (a validated config also carries open_clip's
    defaults, ``model`` and ``pretrained``, for other backbones)."""
    name = str(spec.get("name") or "")
    if name == "open_clip":
        details = [str(spec[k]) for k in ("model",) if spec.get(k)]
        details.append(f"{spec['pretrained']} weights" if spec.get("pretrained") else "random weights")
    else:
        weights = spec.get("weights")
        details = [f"weights {Path(str(weights)).name}" if weights else "ImageNet-1k weights"]
    details.append(f"{spec['image_size']} px" if spec.get("image_size") else "native resolution")
    return f"{name} ({', '.join(details)})"


def _config_section(config: Mapping[str, Any], summary: pd.DataFrame) -> str:
    dataset = config.get("dataset") or {}
    backbone = config.get("backbone") or {}
    studies = C.studies_of(summary)
    items = []
    if len(studies) > 1:
        lines = []
        for study in studies:
            rows = C.study_rows(summary, study)
            lines.append(f"<b>{_e(study)}</b>: dataset {_e(rows['dataset'].iloc[0])}, backbone "
                         f"{_e(rows['backbone'].iloc[0])}, ID {_e(C.id_domain_of(rows))}, OOD "
                         f"{_e(', '.join(C.ood_domains_of(rows)))}")
        items.append(("Studies", "<br>".join(lines)))
    else:
        id_domain = dataset.get("id_domain") or C.id_domain_of(summary)
        ood = dataset.get("ood_domains") or C.ood_domains_of(summary)
        items += [("Dataset", _e(f"{dataset.get('name') or summary['dataset'].iloc[0]}")),
                  ("ID (training) domain", _e(id_domain)), ("OOD domains", _e(", ".join(ood)))]
        described = backbone_description(backbone) if backbone.get("name") else str(summary["backbone"].iloc[0])
        items.append(("Backbone", _e(described)))
    if dataset.get("max_per_class"):
        caps = dataset["max_per_class"]
        items.append(("Images per class (cap)", _e(", ".join(f"{k} {v}" for k, v in caps.items()))))
    items.append(("Reference model (α = 0)", _e(reference_sentence(config, summary))))
    runs = summary[["method", "variant", "seed"]].drop_duplicates()
    methods = []
    for method in C.method_order(runs["method"]):
        variants = []
        names = runs.loc[runs["method"] == method, "variant"].unique()
        for variant in sorted(names, key=lambda v: (v != "default", v)):
            settings = ((config.get("methods") or {}).get(method) or {}).get(variant)
            variants.append(_e(variant) + (f" <code>{_e(json.dumps(settings, sort_keys=True))}</code>"
                                           if settings else ""))
        colour = C.KNOWN_METHOD_COLOURS.get(method, "#999")
        methods.append(f"<span class=\"swatch\" style=\"background:{colour}\"></span><b>{_e(method)}</b>: "
                       + ", ".join(variants))
    items.append(("Methods / variants", "<br>".join(methods)))
    seeds = config.get("seeds") or sorted(runs["seed"].unique())
    items.append(("Seeds", _e(", ".join(map(str, seeds)))))
    alphas = (config.get("sweep") or {}).get("alphas") or sorted(summary["alpha"].unique())
    items.append(("WiSE-FT α", _e(", ".join(f"{a:g}" for a in alphas))))
    cals = sorted(summary["calibration"].unique(), key=lambda c: C.CALIBRATIONS.index(c) if c in C.CALIBRATIONS else 9)
    items.append(("Calibrations", _e(", ".join(C.CALIBRATION_LABELS.get(c, c) for c in cals))))
    skipped = config.get("skipped_images")
    if skipped is not None:
        shown = ", ".join(skipped[:20]) + (f" and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        items.append(("Skipped images", _e(f"{len(skipped)} (dataset.on_bad_image: skip)"
                                           + (f": {shown}" if skipped else ""))))
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f"<section id=\"configuration\"><h2>Configuration</h2><dl class=\"config\">{rows}</dl></section>"


def _html_table(shown: pd.DataFrame, raw: pd.DataFrame | None = None, text_cols=("method", "variant", "weights"),
                css: str = "leaderboard") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in shown.columns)
    body, previous = [], None
    for i, (_, row) in enumerate(shown.iterrows()):
        classes = []
        raw_row = raw.iloc[i] if raw is not None else row
        if raw_row["method"] == C.REFERENCE_METHOD:
            classes.append("reference")
        if str(raw_row.get("point", "")).startswith("oracle"):
            classes.append("oracle")
        group = (raw_row["method"], raw_row.get("protocol"))
        if previous is not None and group != previous:
            classes.append("first")
        previous = group
        cells = []
        for col, value in row.items():
            if col == "method":
                colour = C.KNOWN_METHOD_COLOURS.get(value, "#999")
                cells.append(f"<td><span class=\"swatch\" style=\"background:{colour}\"></span>{_e(value)}</td>")
            else:
                attr = "" if col in text_cols else ' class="num"'
                cells.append(f"<td{attr}>{_e(value)}</td>")
        body.append(f"<tr class=\"{' '.join(classes)}\">{''.join(cells)}</tr>")
    return (f"<div class=\"table\"><table class=\"{css}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _leaderboard_section(number: int, tables: Mapping[str, pd.DataFrame], summary: pd.DataFrame,
                         paired: pd.DataFrame | None = None) -> str:
    caption = ("Test accuracy (%) of each method at α = 1 (the fine-tuned weights) and at the α chosen on ID "
               "validation, seed mean ± s.d. where there are several seeds, each seed at its own chosen α (the "
               "α column lists them when seeds disagree); no calibration. Where a method has several variants (a "
               "grid), its first row is the variant and α chosen on ID validation within each seed (DomainBed's "
               "training-domain validation), the second the variant an oracle picks on OOD test: not a valid "
               "selection, shown to measure the selection gap. Ranked by OOD average at the chosen point; the "
               "reference model on top. Trainable parameters, checkpoint size on disk and wall-clock training time "
               "per run.")
    if paired is not None and len(paired):
        caption += (f" \"{A.MARKS_COLUMN}\": the chosen point's OOD-average difference in points from the reference "
                    "model and from full fine-tuning (α = 1); \"≈\" marks a difference not distinguishable at level "
                    f"{float(paired['level'].iloc[0]):g} (McNemar's exact test, Holm's correction; see Paired "
                    "comparisons).")
    parts = [f"<p class=\"caption\">{_e(caption)}</p>"]
    several = len(tables) > 1
    for study, table in tables.items():
        if several:
            parts.append(f"<h3>{_e(study)}</h3>")
        parts.append(_html_table(A.with_marks(C.leaderboard_display(table), table, paired, study), table))
    if several:
        across = C.backbone_leaderboard_display(C.backbone_leaderboard(summary))
        for dataset, shown in across.items():
            if len(shown.columns) <= 3:
                continue
            parts.append(f"<h3>{_e(dataset)}: across backbones</h3><p class=\"caption\">ID test and OOD-average "
                         "accuracy (%) of each method on every backbone, at the variant and α chosen on ID "
                         "validation (seed mean ± s.d.).</p>")
            parts.append(_html_table(shown, text_cols=("method",)))
    parts.append("<p class=\"files\">Files: <a href=\"leaderboard.csv\">leaderboard.csv</a> · "
                 "<a href=\"leaderboard.txt\">leaderboard.txt</a></p>")
    return f"<section id=\"leaderboard\"><h2>{number}. Leaderboard</h2>{''.join(parts)}</section>"


# ----------------------------------------------------------------------------------------------------- terminal
def print_leaderboard(source: str | Path | pd.DataFrame, file: TextIO | None = None,
                      ood_domains: Sequence[str] | None = None) -> None:
    """Print the leaderboard as a plain-text table: from ``leaderboard.txt``, a summary Parquet file, or a summary."""
    file = file or sys.stdout
    if isinstance(source, pd.DataFrame):
        text = C.leaderboards_text(source, ood_domains)
    elif Path(source).suffix == ".txt":
        text = Path(source).read_text(encoding="utf-8")
    else:
        text = C.leaderboards_text(read_table(source), ood_domains)
    print("\nrobustft leaderboard (test accuracy %, no calibration)\n" + text, file=file, flush=True)
