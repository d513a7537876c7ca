"""The report's analysis parts (results/analysis/*.parquet): the effective-robustness chart on probit axes, its
table, the paired comparisons, the recommendation, and the leaderboard's marks of differences that are not
distinguishable."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

import altair as alt
import numpy as np
import pandas as pd

from robustft.io.tables import read_table
from robustft.report import charts as C

#: The analysis tables the report reads, by name (rules/analyses.smk writes them).
ANALYSIS_TABLES = ("effective_robustness", "paired_tests", "recommendation")
MARKS_COLUMN = "OOD avg Δ vs ref / FT"


def load_analyses(paths: Mapping[str, str | Path] | None) -> dict[str, pd.DataFrame]:
    """The analysis tables by name ({} without paths); an unknown name is refused."""
    out = {}
    for name, path in (paths or {}).items():
        if name not in ANALYSIS_TABLES:
            raise ValueError(f"report: unknown analysis table {name!r} (known: {list(ANALYSIS_TABLES)})")
        out[name] = read_table(path)
    return out


# ------------------------------------------------------------------------------------------------------- chart
def _probit(values) -> np.ndarray:
    from robustft.robustness import clip_accuracy, probit

    return probit(clip_accuracy(np.asarray(values, dtype=np.float64), 10**4))


def effective_robustness_points(er: pd.DataFrame) -> pd.DataFrame:
    """Seed means of the WiSE-FT paths (linear, uncalibrated) per study, method, variant, alpha and OOD domain, on
    probit axes (``x``, ``y``), with their effective robustness."""
    rows = er[(er["interpolation"] == "linear") & (er["calibration"] == "none") & (er["eval_domain"] != "ood_average")]
    rows = rows[(rows["method"] != C.REFERENCE_METHOD) | (rows["alpha"] == 0)]
    keys = ["study", "method", "variant", "protocol", "alpha", "eval_domain"]
    points = rows.groupby(keys, sort=False).agg(
        id_accuracy=("id_accuracy", "mean"), ood_accuracy=("ood_accuracy", "mean"),
        effective_robustness=("effective_robustness", "mean"), baseline=("baseline_kind", "first")).reset_index()
    points["x"], points["y"] = _probit(points["id_accuracy"]), _probit(points["ood_accuracy"])
    points["series"] = [C.series_label(m, v) for m, v in zip(points["method"], points["variant"])]
    return points


def baseline_lines(er: pd.DataFrame, steps: int = 40) -> pd.DataFrame:
    """Each study's and domain's baseline line over the range of its points' ID accuracy, on probit axes."""
    from robustft.robustness import Baseline

    out = []
    lines = er[(er["eval_domain"] != "ood_average") & er["baseline_slope"].notna()]
    for (study, domain), rows in lines.groupby(["study", "eval_domain"], sort=False):
        first = rows.iloc[0]
        low, high = rows["id_accuracy"].min(), rows["id_accuracy"].max()
        x = np.linspace(max(0.01, low - 0.05), min(0.99, high + 0.05), steps)
        line = Baseline(((0.0, float(first["baseline_slope"]), float(first["baseline_intercept"])),),
                        str(first["baseline_kind"]), str(first["baseline_source"]))
        out.append(pd.DataFrame({"study": study, "eval_domain": domain, "x": _probit(x),
                                 "y": _probit(np.clip(line.predict(x), 1e-4, 1 - 1e-4)),
                                 "baseline": f"{first['baseline_kind']} baseline"}))
    # piecewise published lines (ImageNet-A) carry no single slope: drawn from their rows' predictions instead
    piecewise = er[(er["eval_domain"] != "ood_average") & er["baseline_slope"].isna()
                   & (er["baseline_kind"] == "published")]
    for (study, domain), rows in piecewise.groupby(["study", "eval_domain"], sort=False):
        rows = rows.sort_values("id_accuracy")
        out.append(pd.DataFrame({"study": study, "eval_domain": domain, "x": _probit(rows["id_accuracy"]),
                                 "y": _probit(rows["baseline_accuracy"].clip(1e-4, 1 - 1e-4)),
                                 "baseline": "published baseline"}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["study", "eval_domain", "x", "y"])


def effective_robustness_chart(er: pd.DataFrame | None) -> alt.TopLevelMixin:
    """ID vs OOD accuracy on probit axes, a panel per study and OOD domain: each method's WiSE-FT path (seed means)
    and the domain's baseline line (dashed grey); a point's height above the line is its effective robustness."""
    title = "Effective robustness (probit axes)"
    if er is None or er.empty:
        return C._themed(C._note("No effective-robustness table (results/analysis/effective_robustness.parquet).",
                                 title).properties(height=110))
    points = effective_robustness_points(er)
    lines = baseline_lines(er)
    several = points["study"].nunique() > 1
    points["panel"] = [f"{s}: {d}" if several else d for s, d in zip(points["study"], points["eval_domain"])]
    lines["panel"] = [f"{s}: {d}" if several else d for s, d in zip(lines["study"], lines["eval_domain"])]
    panels = list(pd.unique(points["panel"]))
    columns = min(4, len(panels))
    width = C._panel_width(columns, legend=220)
    colour = C.method_colours(points["method"].unique())
    tooltip = ["series:N", "alpha:Q", alt.Tooltip("id_accuracy:Q", format=".3f"),
               alt.Tooltip("ood_accuracy:Q", format=".3f"), alt.Tooltip("effective_robustness:Q", format="+.3f"),
               "baseline:N"]
    x = alt.X("x:Q", title="probit(ID test accuracy)", scale=alt.Scale(zero=False))
    y = alt.Y("y:Q", title="probit(OOD test accuracy)", scale=alt.Scale(zero=False))
    data = pd.concat([points.assign(layer="path"), lines.assign(layer="baseline")], ignore_index=True)
    base = alt.Chart(data)
    on_path = alt.datum.layer == "path"
    paths = base.transform_filter(on_path).mark_line(strokeWidth=1.8).encode(
        x=x, y=y, color=alt.Color("method:N", scale=colour, title="method"), detail="series:N",
        strokeDash=C._dash(C.variant_dashes(points["variant"])), order="alpha:Q").properties(name="er_paths")
    dots = base.transform_filter(on_path).mark_point(filled=True, size=36).encode(
        x=x, y=y, color=alt.Color("method:N", scale=colour, title="method"), tooltip=tooltip
    ).properties(name="er_points")
    baseline = base.transform_filter(alt.datum.layer == "baseline").mark_line(
        color="#888", strokeDash=[5, 4], strokeWidth=1.5).encode(x=x, y=y, detail="baseline:N",
                                                                 tooltip=["baseline:N"]).properties(name="er_baseline")
    chart = alt.layer(baseline, paths, dots).properties(width=width, height=200).facet(
        facet=alt.Facet("panel:N", sort=panels, title=None), columns=columns).resolve_scale(
        x="independent", y="independent")
    return C._themed(chart.properties(title=alt.TitleParams(
        title, subtitle="dashed: the baseline line (published or fitted, see the table); above it = effectively "
                        "robust")))


# ------------------------------------------------------------------------------------------------------ tables
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _pct(value, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _table(frame: pd.DataFrame, text_cols=("study", "method", "variant", "protocol", "against", "domain",
                                             "baseline", "calibration", "tied", "distinguishable")) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = "".join(f"<td>{_e(v)}</td>" if col in text_cols else f"<td class=\"num\">{_e(v)}</td>"
                        for col, v in zip(frame.columns, row))
        body.append(f"<tr>{cells}</tr>")
    return (f"<div class=\"table\"><table class=\"leaderboard\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def effective_robustness_display(er: pd.DataFrame) -> pd.DataFrame:
    """Per study, method and protocol: the reference, the fine-tuned end point (alpha = 1) and the alpha chosen on
    ID validation, ER on the OOD average and each domain in points with the interval, seed means."""
    rows = er[(er["interpolation"] == "linear") & (er["calibration"] == "none")]
    rows = rows[((rows["method"] == C.REFERENCE_METHOD) & (rows["alpha"] == 0))
                | ((rows["method"] != C.REFERENCE_METHOD) & ((rows["alpha"] == 1) | rows["selected_alpha"]))]
    rows = rows.assign(point=np.where(rows["method"] == C.REFERENCE_METHOD, "reference",
                                      np.where(rows["selected_alpha"], "α chosen on ID val", "fine-tuned (α = 1)")))
    keys = ["study", "method", "variant", "protocol", "point", "eval_domain"]
    cells = rows.groupby(keys, sort=False).agg(er=("effective_robustness", "mean"), low=("er_ci_low", "mean"),
                                               high=("er_ci_high", "mean"), alpha=("alpha", "first"),
                                               kind=("baseline_kind", "first")).reset_index()
    domains = list(pd.unique(cells["eval_domain"]))
    domains = ["ood_average", *[d for d in domains if d != "ood_average"]]
    out = []
    for (study, method, variant, protocol, point), group in cells.groupby(keys[:-1], sort=False):
        group = group.set_index("eval_domain")
        entry = {"study": study, "method": method, "variant": variant, "protocol": protocol, "point": point}
        for d in domains:
            if d in group.index:
                g = group.loc[d]
                entry[f"ER {C._domain_label(d)}"] = f"{_pct(g['er'], True)} [{_pct(g['low'], True)}, " \
                                                    f"{_pct(g['high'], True)}]"
        entry["baseline"] = ", ".join(sorted(set(group["kind"])))
        out.append(entry)
    frame = pd.DataFrame(out)
    if frame["study"].nunique() == 1:
        frame = frame.drop(columns="study")
    return frame


def paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """The OOD-average and per-domain differences of each selected point vs the reference and full FT, in points."""
    frame = pd.DataFrame({
        "study": paired["study"], "method": paired["method"], "protocol": paired["protocol"],
        "variant": paired["variant"], "α": paired["alpha"], "against": paired["against"],
        "domain": [C._domain_label(d) for d in paired["eval_domain"]],
        "Δ [CI]": [f"{_pct(d, True)} [{_pct(lo, True)}, {_pct(hi, True)}]" for d, lo, hi in
                   zip(paired["difference"], paired["diff_ci_low"], paired["diff_ci_high"])],
        "better / worse images": [f"{b} / {w}" for b, w in zip(paired["n_better"], paired["n_worse"])],
        "p": [f"{p:.3g}" for p in paired["p_value"]], "Holm p": [f"{p:.3g}" for p in paired["p_holm"]],
        "distinguishable": ["yes" if d else "≈ no" for d in paired["distinguishable"]],
    })
    return frame.drop(columns="study") if frame["study"].nunique() == 1 else frame


def analysis_sections(number: int, analyses: Mapping[str, pd.DataFrame]) -> list[str]:
    """The report sections of the analysis tables present, numbered from ``number``."""
    sections = []
    er = analyses.get("effective_robustness")  # always a section: the chart is one of CHART_NAMES
    caption = ("Effective robustness (Taori et al. 2020; Miller et al. 2021): OOD test accuracy minus what the "
               "baseline line predicts from ID test accuracy, on probit axes, in points; 95 % bootstrap "
               "intervals over test images (the line held fixed). Each OOD domain's line is published where "
               "one exists (ImageNet shifts: Taori et al.'s fit over the imagenet-testbed standard models) and "
               "otherwise fitted by least squares over this study's end points (the reference and each "
               "fine-tuned model at α = 1), labelled fitted: the end points then lie around the line by "
               "construction, and what the fit shows is the bulge of WiSE-FT paths above it. The OOD average's "
               "ER is the mean of the domains' ERs. Seed means; linear interpolation, no calibration.")
    body = (f"<p class=\"caption\">{_e(caption)}</p><div class=\"chart\" id=\"chart-effective_robustness\" "
            "data-chart=\"effective_robustness\" data-status=\"pending\"></div>"
            + (_table(effective_robustness_display(er)) if er is not None and len(er) else
               "<p class=\"note\">No effective-robustness table for this report.</p>")
            + "<p class=\"files\">Files: <a href=\"effective_robustness.png\">effective_robustness.png</a> · "
              "<code>results/analysis/effective_robustness.parquet</code></p>")
    sections.append(f"<section id=\"effective_robustness\"><h2>{number}. Effective robustness</h2>{body}</section>")
    number += 1
    paired = analyses.get("paired_tests")
    if paired is not None:
        level = float(paired["level"].iloc[0]) if len(paired) else 0.05
        caption = ("Each method's selected point (per seed, the variant and α chosen on ID validation) against the "
                   "reference model (α = 0 of the same runs) and against full fine-tuning (full_ft at α = 1, its "
                   "chosen variant, same protocol), on the same test images: the accuracy difference in points with "
                   "a paired bootstrap interval (images resampled, both sides together; the OOD average resamples "
                   "each domain), and McNemar's exact test (with several seeds, the sign test of each image's "
                   "seed-mean difference). p-values are adjusted with Holm's step-down correction over every test "
                   f"of a study; \"≈ no\" marks differences not distinguishable at level {level:g}.")
        body = (f"<p class=\"caption\">{_e(caption)}</p>"
                + (_table(paired_display(paired)) if len(paired) else "<p class=\"note\">No comparisons.</p>")
                + "<p class=\"files\">File: <code>results/analysis/paired_tests.parquet</code></p>")
        sections.append(f"<section id=\"paired_tests\"><h2>{number}. Paired comparisons</h2>{body}</section>")
        number += 1
    rec = analyses.get("recommendation")
    if rec is not None:
        from robustft.recommend import recommendation_display

        floor = str(rec["floor"].iloc[0]) if len(rec) else "–"
        caption = (f"Under the ID floor {floor} (analyses.id_floor; an accuracy, or best-<points> below the best "
                   "point), checked on ID validation: the (method, variant, α, calibration) points with the best "
                   "OOD-average test accuracy (seed means, 95 % bootstrap intervals over test images), and each "
                   "one's paired difference from the best (McNemar / sign test, Holm's correction over the "
                   "comparisons with the best); \"tied\" = not distinguishable from the best. Shown: the best, every "
                   "tie, and the ten best. Any other floor: python -m robustft recommend --id-floor ... on this "
                   "results folder. OOD accuracy is test accuracy: this ranks what the study measured; it is not a "
                   "model selection.")
        body = (f"<p class=\"caption\">{_e(caption)}</p>"
                + (_table(_drop_single_study(recommendation_display(rec, top=10))) if len(rec)
                   else "<p class=\"note\">No point clears the ID floor.</p>")
                + "<p class=\"files\">File: <code>results/analysis/recommendation.parquet</code></p>")
        sections.append(f"<section id=\"recommendation\"><h2>{number}. Recommendation under an ID floor</h2>"
                        f"{body}</section>")
    return sections


def _drop_single_study(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns="study") if "study" in frame and frame["study"].nunique() == 1 else frame


def with_marks(shown: pd.DataFrame, table: pd.DataFrame, paired: pd.DataFrame | None, study: str) -> pd.DataFrame:
    """The leaderboard display with a column of the selected point's OOD-average differences from the reference and
    from full fine-tuning ("≈" where not distinguishable after Holm's correction), on the chosen rows."""
    if paired is None or paired.empty:
        return shown
    from robustft.significance import leaderboard_marks

    compared = set(zip(paired["method"], paired["protocol"]))
    protocols = table["protocol"] if "protocol" in table else pd.Series("full", index=table.index)
    grids = set(zip(table.loc[table["point"] == C.POINT_SELECTED_VARIANT, "method"],
                    protocols[table["point"] == C.POINT_SELECTED_VARIANT]))
    marks = []
    for (_, row), protocol in zip(table.iterrows(), protocols):
        chosen = C.POINT_SELECTED_VARIANT if (row["method"], protocol) in grids else C.POINT_CHOSEN
        if row["point"] == chosen and (row["method"], protocol) in compared:
            marks.append(leaderboard_marks(paired, study, row["method"], protocol))
        else:
            marks.append("")
    out = shown.copy()
    out.insert(out.columns.get_loc("OOD avg") + 1, MARKS_COLUMN, marks)
    return out
