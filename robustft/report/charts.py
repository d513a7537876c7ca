"""The report's tables and charts: pure functions from DataFrames to DataFrames and Altair charts (no file I/O).

Accuracies stay fractions in [0, 1] (shown as percentages); every chart colours a method the same way
(:func:`method_colours`), and each mark layer carries a ``name`` so that tests can count its SVG marks.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import altair as alt
import numpy as np
import pandas as pd

REFERENCE_METHOD = "zeroshot"
OOD_AVERAGE = "ood_average"

#: Methods in the order the report lists them; a fixed colour each, so every chart colours a method alike.
KNOWN_METHOD_COLOURS = {
    "zeroshot": "#222222",
    "linear_probe": "#79706e",
    "full_ft": "#e15759",
    "lp_ft": "#f28e2b",
    "l2sp": "#4e79a7",
    "l1sp": "#76b7b2",
    "kd": "#59a14f",
    "ewc": "#b6992d",
    "lora": "#b07aa1",
    "saft": "#d37295",
    "flyp": "#9c755f",
    "uniform_soup": "#1b9e77",  # model soups (robustft.soups): runs of their own, after the methods they average
    "greedy_soup": "#6a3d9a",
}
_SPARE_COLOURS = ("#17becf", "#8c564b", "#bcbd22", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f")
_DASHES = ([1, 0], [6, 3], [2, 2], [8, 3, 2, 3], [1, 3])

POINT_KINDS = ("reference (α = 0)", "WiSE-FT (0 < α < 1)", "fine-tuned (α = 1)")
CALIBRATIONS = ("none", "alg", "pcv")
CALIBRATION_LABELS = {"none": "none", "alg": "ALG", "pcv": "PCV"}
FONT = "Helvetica, Arial, sans-serif"


# ----------------------------------------------------------------------------------------------------------- helpers
def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in report order: the known ones as listed in ``KNOWN_METHOD_COLOURS``, then others alphabetically."""
    methods = set(methods)
    known = [m for m in KNOWN_METHOD_COLOURS if m in methods]
    return known + sorted(methods - set(known))


def method_colours(methods: Iterable[str]) -> alt.Scale:
    """The colour scale shared by every chart: a fixed colour per known method, spare colours for the rest."""
    order = method_order(methods)
    spare = iter(_SPARE_COLOURS * (1 + len(order) // len(_SPARE_COLOURS)))
    return alt.Scale(domain=order, range=[KNOWN_METHOD_COLOURS.get(m) or next(spare) for m in order])


def variant_dashes(variants: Iterable[str]) -> alt.Scale:
    """Stroke dashes per variant: ``default`` solid, the others dashed."""
    order = sorted(set(variants), key=lambda v: (v != "default", v))
    return alt.Scale(domain=order, range=[list(_DASHES[i % len(_DASHES)]) for i in range(len(order))])


def _method_legend(methods: Iterable[str], **options) -> alt.Legend:
    """A method legend listing only the methods a chart draws (the colour scale keeps every method)."""
    return alt.Legend(values=method_order(methods), symbolOpacity=1, **options)


def _dash(dashes: alt.Scale) -> alt.StrokeDash:
    """The variant channel; its legend only where there are several variants."""
    legend = alt.Legend(symbolType="stroke", symbolSize=250) if len(dashes.domain) > 1 else None
    return alt.StrokeDash("variant:N", scale=dashes, title="variant", legend=legend)


def series_label(method: str, variant: str) -> str:
    return method if variant == "default" else f"{method} ({variant})"


def studies_of(summary: pd.DataFrame) -> list[str]:
    """The summary's studies in order of appearance (one unnamed study for a summary without a ``study`` column)."""
    if "study" not in summary or summary.empty:
        return [""]
    return [str(s) for s in pd.unique(summary["study"])]


def study_rows(summary: pd.DataFrame, study: str) -> pd.DataFrame:
    """The rows of one study (every row where there is no ``study`` column)."""
    return summary if "study" not in summary else summary[summary["study"] == study]


def dataset_labels(summary: pd.DataFrame) -> dict[str, str]:
    """Study -> the label of its dataset. Studies share a dataset where their folders' dataset part
    (``<dataset>/<backbone>``) is the same: same data, ID domain, OOD domains and caps. The label is the dataset's name,
    with the ID domain where two datasets of the config share a name (PACS photo -> ... and PACS sketch -> ...), and
    the folder where even that is ambiguous."""
    keys, names = {}, {}
    for study in studies_of(summary):
        rows = study_rows(summary, study)
        name = str(rows["dataset"].iloc[0]) if "dataset" in rows and len(rows) else ""
        keys[study] = study.rsplit("/", 1)[0] if "/" in study else name
        names[keys[study]] = (name, id_domain_of(rows) if len(rows) else "")
    labels = {}
    for key, (name, id_domain) in names.items():
        same_name = [k for k, (n, _) in names.items() if n == name]
        same_domain = [k for k, (n, d) in names.items() if (n, d) == (name, id_domain)]
        labels[key] = (name if len(same_name) == 1 else f"{name} (ID {id_domain})" if len(same_domain) == 1
                       else f"{name} ({key})")
    return {study: labels[key] for study, key in keys.items()}


def datasets_of(summary: pd.DataFrame) -> dict[str, list[str]]:
    """Dataset label (:func:`dataset_labels`) -> its studies (backbones), in order of appearance."""
    out: dict[str, list[str]] = {}
    for study, label in dataset_labels(summary).items():
        out.setdefault(label, []).append(study)
    return out


def grid_groups(summary: pd.DataFrame) -> set[tuple[str, str]]:
    """(method, protocol) pairs with several variants: a hyperparameter grid that variant selection chooses from."""
    if "protocol" not in summary:
        return set()
    counts = summary.groupby(["method", "protocol"])["variant"].nunique()
    return {key for key, n in counts.items() if n > 1}


def id_domain_of(summary: pd.DataFrame) -> str:
    """The ID (training) domain of the summary."""
    domains = summary["train_domain"].dropna().unique()
    if len(domains) != 1:
        raise ValueError(f"summary: expected one training domain, found {sorted(map(str, domains))}")
    return str(domains[0])


def ood_domains_of(summary: pd.DataFrame, ood_domains: Sequence[str] | None = None) -> list[str]:
    """OOD domain names in config order when given, else in order of appearance (the OOD average excluded)."""
    present = [d for d in pd.unique(summary.loc[summary["is_ood"].astype(bool), "eval_domain"]) if d != OOD_AVERAGE]
    if ood_domains:
        return [d for d in ood_domains if d in present] + [d for d in present if d not in ood_domains]
    return list(present)


def _domain_label(domain: str) -> str:
    return "OOD average" if domain == OOD_AVERAGE else domain


def _base(summary: pd.DataFrame, interpolation: str = "linear", calibration: str = "none") -> pd.DataFrame:
    rows = summary[(summary["interpolation"] == interpolation) & (summary["calibration"] == calibration)]
    return rows[rows["split"] == "test"]


def _note(text: str, title: str) -> alt.Chart:
    """A chart that only says ``text`` (so that the declared chart files exist even when there is nothing to draw)."""
    return (alt.Chart(pd.DataFrame({"text": [text]})).mark_text(fontSize=14, color="#555").properties(name="note")
            .encode(text="text:N").properties(width=520, height=60, title=title))


def _stack(charts: Sequence[alt.TopLevelMixin], **options) -> alt.TopLevelMixin:
    """One chart, or several stacked vertically (a study or dataset each)."""
    return charts[0] if len(charts) == 1 else alt.vconcat(*charts, spacing=36, **options)


def _panel_width(columns: int, legend: int = 200, page: int = 1280, axis: int = 90, widest: int = 250) -> int:
    """Width of one facet panel so that ``columns`` panels, their axes and a legend fit a 1400 px page."""
    return int(max(150, min(widest, (page - legend) / max(1, columns) - axis)))


def _themed(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    return (chart.configure(font=FONT)
            .configure_axis(labelFontSize=11, titleFontSize=12, gridColor="#e6e6e6", domainColor="#888")
            .configure_header(labelFontSize=13, titleFontSize=13)
            .configure_legend(labelFontSize=11, titleFontSize=12, symbolStrokeWidth=2, labelLimit=260)
            .configure_title(fontSize=15, subtitleFontSize=11, subtitleColor="#555", anchor="start")
            .configure_view(stroke="#bbb"))


# ------------------------------------------------------------------------------------------------- 1. ID vs OOD
def variant_votes(summary: pd.DataFrame, column: str) -> dict[tuple[str, str], str]:
    """(method, protocol) -> the variant most seeds chose by ``column`` (``selected_variant`` on ID validation,
    ``oracle_variant`` on OOD test), for grids only (ties: ``default``, then the first name)."""
    grids = grid_groups(summary)
    if not grids or column not in summary:
        return {}
    runs = summary[summary[column].astype(bool)].drop_duplicates(["method", "protocol", "variant", "seed"])
    votes = runs.groupby(["method", "protocol", "variant"]).size().reset_index(name="seeds")
    votes["_default"] = votes["variant"] != "default"
    votes = votes.sort_values(["seeds", "_default", "variant"], ascending=[False, True, True])
    return {(m, p): v for m, p, v in votes.drop_duplicates(["method", "protocol"])[["method", "protocol", "variant"]]
            .itertuples(index=False) if (m, p) in grids}


def id_vs_ood_points(
    summary: pd.DataFrame,
    ood_domains: Sequence[str] | None = None,
    interpolation: str = "linear",
    calibration: str = "none",
) -> pd.DataFrame:
    """One row per (method, variant, alpha, panel) of one study: ID-test and OOD accuracy, seed means with error
    bounds.

    Error bounds are ±1 s.d. over seeds where a point has several seeds, else the 95% bootstrap CI. The reference
    method appears once, at alpha 0. ``selected`` marks the alpha chosen on ID validation by most seeds (for a grid of
    variants, on the variant most seeds chose on ID validation only); ``oracle`` the same point of the variant the
    oracle picked on OOD test (grids only; not a valid selection); ``drawn`` the rows drawn as points (the reference
    once per panel), ``show_error`` those drawn with error bars.
    """
    rows = _base(summary, interpolation, calibration)
    id_domain = id_domain_of(summary)
    panels = [*ood_domains_of(summary, ood_domains), OOD_AVERAGE]
    keys = ["method", "variant", "seed", "alpha"]
    id_rows = rows[rows["eval_domain"] == id_domain][[*keys, "accuracy", "accuracy_ci_low", "accuracy_ci_high",
                                                      "selected_alpha"]]
    id_rows = id_rows.rename(columns={"accuracy": "id_acc", "accuracy_ci_low": "id_ci_low",
                                      "accuracy_ci_high": "id_ci_high"})
    ood_rows = rows[rows["eval_domain"].isin(panels)][[*keys, "eval_domain", "accuracy", "accuracy_ci_low",
                                                        "accuracy_ci_high"]]
    ood_rows = ood_rows.rename(columns={"eval_domain": "panel", "accuracy": "ood_acc", "accuracy_ci_low": "ood_ci_low",
                                        "accuracy_ci_high": "ood_ci_high"})
    merged = ood_rows.merge(id_rows, on=keys, how="inner")
    is_ref = merged["method"] == REFERENCE_METHOD
    merged = merged[~is_ref | (merged["alpha"] == merged.loc[is_ref, "alpha"].min())].copy()
    if merged.empty:
        return pd.DataFrame(columns=["method", "variant", "series", "alpha", "panel", "panel_label", "kind", "id_acc",
                                     "ood_acc", "id_lo", "id_hi", "ood_lo", "ood_hi", "n_seeds", "selected", "oracle",
                                     "selected_seeds", "error"])
    group = merged.groupby(["method", "variant", "alpha", "panel"], sort=False)
    out = group.agg(id_acc=("id_acc", "mean"), ood_acc=("ood_acc", "mean"), id_sd=("id_acc", "std"),
                    ood_sd=("ood_acc", "std"), n_seeds=("seed", "nunique"), selected_seeds=("selected_alpha", "sum"),
                    id_ci_low=("id_ci_low", "mean"), id_ci_high=("id_ci_high", "mean"),
                    ood_ci_low=("ood_ci_low", "mean"), ood_ci_high=("ood_ci_high", "mean")).reset_index()
    several = out["n_seeds"] > 1
    for axis in ("id", "ood"):
        sd = out[f"{axis}_sd"].fillna(0.0)
        out[f"{axis}_lo"] = np.where(several, out[f"{axis}_acc"] - sd, out[f"{axis}_ci_low"])
        out[f"{axis}_hi"] = np.where(several, out[f"{axis}_acc"] + sd, out[f"{axis}_ci_high"])
    out["error"] = np.where(several, "±1 s.d. over seeds", "95% bootstrap CI")
    out.loc[out[["ood_lo", "ood_hi"]].isna().all(axis=1), "error"] = "none"
    out["series"] = [series_label(m, v) for m, v in zip(out["method"], out["variant"])]
    out["panel_label"] = out["panel"].map(_domain_label)
    is_ref = out["method"] == REFERENCE_METHOD
    out["kind"] = np.select([is_ref | (out["alpha"] == 0), out["alpha"] == 1], [POINT_KINDS[0], POINT_KINDS[2]],
                            POINT_KINDS[1])
    # the alpha most seeds chose on ID validation (ties: the smaller alpha), per series
    votes = out[out["panel"] == panels[-1]] if (out["panel"] == panels[-1]).any() else out
    votes = votes[~(votes["method"] == REFERENCE_METHOD)]
    best = (votes[votes["selected_seeds"] > 0].sort_values(["selected_seeds", "alpha"], ascending=[False, True])
            .drop_duplicates(["method", "variant"])[["method", "variant", "alpha"]].assign(best_alpha=True))
    out = out.merge(best, on=["method", "variant", "alpha"], how="left")
    best_alpha = out["best_alpha"].astype("boolean").fillna(False).astype(bool)
    protocol = (rows.drop_duplicates(["method", "variant"]).set_index(["method", "variant"])["protocol"]
                if "protocol" in rows else pd.Series(dtype=object))
    chosen, oracle = variant_votes(summary, "selected_variant"), variant_votes(summary, "oracle_variant")
    group_of = [(m, protocol.get((m, v), "full")) for m, v in zip(out["method"], out["variant"])]
    in_grid = np.array([g in chosen for g in group_of], dtype=bool)
    out["selected"] = best_alpha & (~in_grid | np.array([chosen.get(g) == v for g, v in zip(group_of, out["variant"])]))
    out["oracle"] = best_alpha & in_grid & np.array([oracle.get(g) == v for g, v in zip(group_of, out["variant"])])
    out = out.drop(columns="best_alpha")
    out["panel"] = pd.Categorical(out["panel"], categories=panels)
    out = out.sort_values(["panel", "method", "variant", "alpha"]).reset_index(drop=True)
    out["panel"] = out["panel"].astype(str)
    # one point per panel for the reference model (the reference run, else the first series' alpha 0)
    if is_ref.any():
        reference = out["method"] == REFERENCE_METHOD
    else:
        reference = (out["alpha"] == 0) & (out["series"] == out["series"].iloc[0])
    out["drawn"] = reference | (out["kind"] != POINT_KINDS[0])
    # seed spreads are drawn everywhere; a single run's (wide) CIs only at the reference, alpha = 1 and the chosen alpha
    out["show_error"] = out["drawn"] & ((out["n_seeds"] > 1) | (out["kind"] != POINT_KINDS[1]) | out["selected"])
    return out


def id_vs_ood_chart(
    summary: pd.DataFrame,
    ood_domains: Sequence[str] | None = None,
    columns: int = 4,
    panel_size: tuple[int, int] | None = None,
    interpolation: str = "linear",
    calibration: str = "none",
) -> alt.TopLevelMixin:
    """ID vs OOD accuracy along every method's WiSE-FT path (alpha 0 → 1), one panel per OOD domain and the average;
    one block per dataset; where a dataset has several backbones, a column of panels per backbone."""
    blocks = []
    for index, (dataset, studies) in enumerate(datasets_of(summary).items()):
        block = _id_vs_ood_dataset(summary, dataset, studies, ood_domains, columns, panel_size, interpolation,
                                   calibration, index)
        if block is not None:
            blocks.append(block)
    if not blocks:
        return _themed(_note("No ID/OOD test accuracies in the summary.", "ID vs OOD accuracy"))
    chart = _stack(blocks)
    if len(blocks) > 1:
        chart = chart.resolve_scale(color="independent", shape="independent", size="independent",
                                    strokeDash="independent")
    return _themed(chart)


def _id_vs_ood_dataset(summary, dataset, studies, ood_domains, columns, panel_size, interpolation, calibration,
                       index) -> alt.TopLevelMixin | None:
    frames = []
    for study in studies:
        rows = study_rows(summary, study)
        points = id_vs_ood_points(rows, ood_domains, interpolation, calibration)
        if len(points):
            backbone = str(rows["backbone"].iloc[0]) if "backbone" in rows else study
            frames.append(points.assign(study=study, backbone=backbone))
    if not frames:
        return None
    points = pd.concat(frames, ignore_index=True)
    several = len(frames) > 1
    id_domain = id_domain_of(study_rows(summary, studies[0]))
    panel_order = [_domain_label(p) for p in pd.unique(points["panel"])]
    backbones = list(pd.unique(points["backbone"]))
    # several backbones: a column each, a row per OOD panel; else the panels side by side (wrapped)
    n_columns = len(backbones) if several else min(columns, len(panel_order))
    colour = method_colours(summary["method"].unique())
    dashes = variant_dashes(points["variant"])
    labels = [*colour.domain, *dashes.domain, *POINT_KINDS]
    legend = min(300, 60 + 7 * max(len(str(label)) for label in labels))
    width, height = panel_size or (_panel_width(n_columns, legend=legend), 210)
    tag = "" if index == 0 else f"_{index}"  # unique layer and parameter names per block of a concatenation
    name = f"pick_method{tag}"
    highlight = alt.selection_point(fields=["method"], bind="legend", name=name)
    fade = alt.condition(highlight, alt.value(1.0), alt.value(0.12))
    x = alt.X("id_acc:Q", title=f"ID test accuracy ({id_domain})", scale=alt.Scale(zero=False, nice=True),
              axis=alt.Axis(format=".1~%", tickCount=5, tickMinStep=0.01))
    y = alt.Y("ood_acc:Q", title="OOD test accuracy", scale=alt.Scale(zero=False, nice=True),
              axis=alt.Axis(format=".1~%", tickCount=5, tickMinStep=0.01))
    tooltip = [
        alt.Tooltip("series:N", title="method"), alt.Tooltip("variant:N"), alt.Tooltip("backbone:N"),
        alt.Tooltip("panel_label:N", title="OOD"),
        alt.Tooltip("alpha:Q", title="α", format=".2f"), alt.Tooltip("id_acc:Q", title="ID acc", format=".2%"),
        alt.Tooltip("ood_acc:Q", title="OOD acc", format=".2%"), alt.Tooltip("n_seeds:Q", title="seeds"),
        alt.Tooltip("error:N", title="error bars"), alt.Tooltip("ood_lo:Q", title="OOD low", format=".2%"),
        alt.Tooltip("ood_hi:Q", title="OOD high", format=".2%"),
        alt.Tooltip("selected_seeds:Q", title="chosen on ID val (seeds)"),
    ]
    trained = alt.datum.method != REFERENCE_METHOD
    trained_methods = [m for m in colour.domain if m != REFERENCE_METHOD]
    method_colour = alt.Color("method:N", scale=colour, title="method", legend=alt.Legend(
        values=trained_methods, orient="right", symbolType="stroke", symbolSize=300, symbolStrokeWidth=3,
        symbolOpacity=1))
    detail = ["series:N", "backbone:N"]
    paths = (alt.Chart().transform_filter(trained).mark_line(strokeWidth=2.2).properties(name=f"wise_paths{tag}")
             .encode(x=x, y=y, order="alpha:Q", detail=detail, color=method_colour, strokeDash=_dash(dashes),
                     opacity=fade))
    x_bars = (alt.Chart().transform_filter("datum.show_error && isValid(datum.id_lo) && isValid(datum.id_hi)")
              .mark_rule(strokeWidth=1.2).properties(name=f"id_error_bars{tag}")
              .encode(x="id_lo:Q", x2="id_hi:Q", y=y, color=method_colour,
                      opacity=alt.condition(highlight, alt.value(0.55), alt.value(0.06))))
    y_bars = (alt.Chart().transform_filter("datum.show_error && isValid(datum.ood_lo) && isValid(datum.ood_hi)")
              .mark_rule(strokeWidth=1.2).properties(name=f"ood_error_bars{tag}")
              .encode(x=x, y="ood_lo:Q", y2="ood_hi:Q", color=method_colour,
                      opacity=alt.condition(highlight, alt.value(0.55), alt.value(0.06))))
    kind_legend = alt.Legend(symbolFillColor="#555", symbolStrokeColor="white")
    marks = (alt.Chart().transform_filter(alt.datum.drawn)
             .mark_point(filled=True, opacity=1, stroke="white", strokeWidth=0.8).properties(name=f"alpha_points{tag}")
             .encode(x=x, y=y,
                     color=alt.condition(f"datum.kind == '{POINT_KINDS[0]}'", alt.value("#222222"),
                                         method_colour),
                     shape=alt.Shape("kind:N", title="point", sort=list(POINT_KINDS), scale=alt.Scale(
                         domain=list(POINT_KINDS), range=["square", "circle", "diamond"]), legend=kind_legend),
                     size=alt.Size("kind:N", title="point", sort=list(POINT_KINDS), scale=alt.Scale(
                         type="ordinal", domain=list(POINT_KINDS), range=[110, 45, 170]), legend=kind_legend),
                     opacity=fade, tooltip=tooltip)
             .add_params(highlight))
    selected = (alt.Chart().transform_filter(alt.datum.selected)
                .mark_point(shape="circle", filled=False, size=380, strokeWidth=2.2).properties(name=f"selected_points{tag}")
                .encode(x=x, y=y, color=method_colour, opacity=fade, tooltip=tooltip))
    layers = [x_bars, y_bars, paths, marks, selected]
    has_oracle = bool(points["oracle"].any())
    if has_oracle:
        oracle_tip = [alt.Tooltip("series:N", title="oracle pick (OOD test; not a valid selection)"), *tooltip[3:]]
        layers.append(alt.Chart().transform_filter(alt.datum.oracle)
                      .mark_point(shape="cross", filled=True, size=170, strokeWidth=0.8, stroke="white",
                                  angle=45).properties(name=f"oracle_points{tag}")
                      .encode(x=x, y=y, color=method_colour, opacity=fade, tooltip=oracle_tip))
    layers.append(alt.Chart().transform_filter(f"datum.drawn && datum.kind == '{POINT_KINDS[0]}'")
                  .mark_text(align="left", baseline="top", dx=7, dy=5, fontSize=11, color="#222")
                  .properties(name=f"reference_label{tag}").encode(x=x, y=y, text=alt.value("reference")))
    layered = alt.layer(*layers, data=points).properties(width=width, height=height)
    errors = sorted(set(points.loc[points["show_error"], "error"]) - {"none"})
    if "95% bootstrap CI" in errors and (~points["show_error"] & points["drawn"]).any():
        errors[errors.index("95% bootstrap CI")] = "95% bootstrap CI (at α = 0, α = 1 and the chosen α)"
    subtitle = [
        "Each line is one method's WiSE-FT path from the reference model (α = 0, black square) to the fine-tuned "
        "model (α = 1, diamond);",
        "the ring marks the α chosen on ID validation" + (
            " (for a grid of variants, on the variant chosen on ID validation; ✕: the variant an oracle picks on OOD "
            "test, not a valid selection)" if has_oracle else "") + ".",
        f"Error bars: {' or '.join(errors) if errors else 'none'}.",
    ]
    title = "ID vs OOD accuracy along the WiSE-FT interpolation path"
    if len(datasets_of(summary)) > 1 or several:
        title += f": {dataset}" + (" (one column per backbone)" if several else "")
    header = alt.Header(labelFontSize=13, labelFontWeight="bold", labelPadding=6)
    if several:
        chart = layered.facet(
            column=alt.Column("backbone:N", sort=backbones, title=None, header=header),
            row=alt.Row("panel_label:N", sort=panel_order, title=None,
                        header=alt.Header(labelFontSize=13, labelFontWeight="bold", labelAngle=-90)),
            title=alt.Title(title, subtitle=subtitle))
    else:
        chart = layered.facet(facet=alt.Facet("panel_label:N", sort=panel_order, title=None, header=header),
                              columns=n_columns, title=alt.Title(title, subtitle=subtitle))
    return chart.resolve_scale(y="independent", x="independent")


# ---------------------------------------------------------------------------------------------- 2. leaderboard
POINT_LAST = "fine-tuned (α = 1)"
POINT_CHOSEN = "WiSE-FT (α chosen on ID val)"
POINT_REFERENCE = "reference"
POINT_SELECTED_VARIANT = "variant and α chosen on ID val"
POINT_ORACLE_VARIANT = "oracle: variant chosen on OOD test (not a valid selection)"
_POINT_ORDER = {POINT_SELECTED_VARIANT: 0, POINT_ORACLE_VARIANT: 1, POINT_LAST: 2, POINT_CHOSEN: 3, POINT_REFERENCE: 4}


def _joined(values: Iterable) -> str:
    return "/".join(str(v) for v in sorted(set(values), key=lambda v: (v != "default", v)))


def leaderboard(
    summary: pd.DataFrame,
    ood_domains: Sequence[str] | None = None,
    interpolation: str = "linear",
    calibration: str = "none",
) -> pd.DataFrame:
    """One study's leaderboard. Per method/variant, at alpha = 1 and at the alpha each seed chose on ID validation:
    ID, OOD average and per-domain test accuracy (mean over seeds, each seed at its own point; the seed s.d. in
    ``*_sd`` columns), trainable parameters, checkpoint size and training time. The reference method has one row.

    Where a method has several variants under one protocol (a grid), two rows come first: the variant (and alpha)
    chosen on ID validation within each seed (DomainBed's training-domain validation), and the oracle's pick on OOD
    test, which is not a valid selection and shows the selection gap. Entries are ranked by OOD average at the
    chosen point (a grid by its ID-validation pick), best first, the reference on top.
    """
    rows = _base(summary, interpolation, calibration)
    id_domain = id_domain_of(summary)
    domains = [id_domain, OOD_AVERAGE, *ood_domains_of(summary, ood_domains)]
    rows = rows[rows["eval_domain"].isin(domains)]
    if "protocol" not in rows:
        rows = rows.assign(protocol="full")
    keys = ["method", "variant", "seed"]
    grids = grid_groups(summary)
    last = rows[rows["alpha"] == rows.groupby(keys)["alpha"].transform("max")].assign(point=POINT_LAST)
    chosen = rows[rows["selected_alpha"].astype(bool) & (rows["method"] != REFERENCE_METHOD)]
    parts = [last, chosen.assign(point=POINT_CHOSEN)]
    in_grid = pd.Series([(m, p) in grids for m, p in zip(chosen["method"], chosen["protocol"])], index=chosen.index,
                        dtype=bool)
    for column, point in (("selected_variant", POINT_SELECTED_VARIANT), ("oracle_variant", POINT_ORACLE_VARIANT)):
        if column in chosen:
            picked = chosen[in_grid & chosen[column].astype(bool)]
            parts.append(picked.assign(point=point))
    both = pd.concat(parts, ignore_index=True)
    both.loc[both["method"] == REFERENCE_METHOD, "point"] = POINT_REFERENCE
    both["entry"] = np.where(both["point"].isin([POINT_SELECTED_VARIANT, POINT_ORACLE_VARIANT]), "", both["variant"])
    index = ["method", "protocol", "entry", "point", "seed"]
    wide = both.pivot_table(index=index, columns="eval_domain", values="accuracy").reset_index()
    labels = both.groupby(index).agg(variant=("variant", "first"), alpha=("alpha", "first")).reset_index()
    costs = both.groupby(index)[["trainable_params", "total_params", "checkpoint_bytes", "train_seconds"]].first()
    wide = wide.merge(labels, on=index).merge(costs.reset_index(), on=index)
    group = wide.groupby(["method", "protocol", "entry", "point"], sort=False)
    table = group.agg(variant=("variant", _joined), seeds=("seed", "nunique"),
                      alpha=("alpha", lambda a: "/".join(f"{v:g}" for v in sorted(set(a)))),
                      **{d: (d, "mean") for d in domains if d in wide},
                      **{f"{d}_sd": (d, "std") for d in domains if d in wide},
                      trainable_params=("trainable_params", "mean"), total_params=("total_params", "mean"),
                      checkpoint_bytes=("checkpoint_bytes", "mean"), train_seconds=("train_seconds", "mean"))
    table = table.reset_index()
    table = table.rename(columns={id_domain: "id", f"{id_domain}_sd": "id_sd"})
    score_col = OOD_AVERAGE if OOD_AVERAGE in table else "id"
    score = {(r.method, r.protocol, r.entry, r.point): r[score_col] for _, r in table.iterrows()}

    def entry_score(method, protocol, entry):
        point = POINT_REFERENCE if method == REFERENCE_METHOD else POINT_CHOSEN
        return score.get((method, protocol, entry, point), 0.0)

    def sort_key(i):
        r = table.loc[i]
        grid = (r["method"], r["protocol"]) in grids
        block = (-score.get((r["method"], r["protocol"], "", POINT_SELECTED_VARIANT), 0.0) if grid
                 else -entry_score(r["method"], r["protocol"], r["entry"]))
        inner = (r["entry"] != "", -entry_score(r["method"], r["protocol"], r["entry"]), r["entry"])
        return (r["method"] != REFERENCE_METHOD, block, r["method"], r["protocol"], *inner, _POINT_ORDER[r["point"]])

    table = table.loc[sorted(table.index, key=sort_key)].reset_index(drop=True)
    table = table.drop(columns="entry")
    table.attrs.update(id_domain=id_domain, ood_domains=[d for d in domains[2:] if d in table])
    return table


def leaderboards(summary: pd.DataFrame, ood_domains: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Study -> its :func:`leaderboard`."""
    return {study: leaderboard(study_rows(summary, study), ood_domains) for study in studies_of(summary)}


def backbone_leaderboard(summary: pd.DataFrame, interpolation: str = "linear", calibration: str = "none"
                         ) -> pd.DataFrame:
    """Across backbones, per dataset: each method's ID and OOD-average test accuracy (seed means, each seed at the
    variant and alpha it chose on ID validation) for every backbone of the dataset; one row per (dataset, method)."""
    rows = _base(summary, interpolation, calibration)
    if "study" not in rows:
        rows = rows.assign(study="")
    rows = rows.assign(dataset=rows["study"].map(dataset_labels(summary)).fillna(rows["dataset"]))
    rows = rows[(rows["eval_domain"] == rows["train_domain"]) | (rows["eval_domain"] == OOD_AVERAGE)]
    picked = rows[rows["selected_alpha"].astype(bool)]
    if "selected_variant" in picked:
        picked = picked[picked["selected_variant"].astype(bool)]
    picked = picked.assign(measure=np.where(picked["eval_domain"] == OOD_AVERAGE, "OOD avg", "ID"))
    runs = picked.groupby(["dataset", "backbone", "method", "measure", "seed"]).agg(
        accuracy=("accuracy", "mean"), variant=("variant", "first")).reset_index()
    cells = runs.groupby(["dataset", "backbone", "method", "measure"]).agg(
        accuracy=("accuracy", "mean"), sd=("accuracy", "std"), seeds=("seed", "nunique"),
        variant=("variant", _joined)).reset_index()
    order = {m: i for i, m in enumerate(method_order(cells["method"]))}
    datasets = {d: i for i, d in enumerate(pd.unique(rows["dataset"]))}  # as the summary lists them
    cells["_order"], cells["_dataset"] = cells["method"].map(order), cells["dataset"].map(datasets)
    table = cells.sort_values(["_dataset", "_order", "backbone", "measure"]).drop(columns=["_order", "_dataset"])
    table.attrs["backbones"] = {d: list(pd.unique(g["backbone"])) for d, g in
                                rows.drop_duplicates(["dataset", "backbone"]).groupby("dataset", sort=False)}
    return table.reset_index(drop=True)


def backbone_leaderboard_display(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Dataset -> a table with one row per method and, per backbone, its ID and OOD-average accuracy in %."""
    out = {}
    for dataset, rows in table.groupby("dataset", sort=False):
        backbones = table.attrs.get("backbones", {}).get(dataset) or list(pd.unique(rows["backbone"]))
        shown = []
        for method in method_order(rows["method"]):
            entry = {"method": method}
            for backbone in backbones:
                for measure in ("ID", "OOD avg"):
                    cell = rows[(rows["method"] == method) & (rows["backbone"] == backbone)
                                & (rows["measure"] == measure)]
                    if cell.empty:
                        entry[f"{backbone} {measure}"] = "–"
                        continue
                    c = cell.iloc[0]
                    spread = c["seeds"] > 1 and pd.notna(c["sd"]) and method != REFERENCE_METHOD
                    entry[f"{backbone} {measure}"] = (f"{100 * c['accuracy']:.1f} ± {100 * c['sd']:.1f}" if spread
                                                      else f"{100 * c['accuracy']:.1f}")
            shown.append(entry)
        out[str(dataset)] = pd.DataFrame(shown)
    return out


def leaderboard_display(table: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard formatted for reading: accuracies in %, "± s.d." where several seeds, sizes in MB."""
    id_domain = table.attrs.get("id_domain", "ID")
    ood = table.attrs.get("ood_domains", [])

    def acc(row, col):
        value, sd = row.get(col), row.get(f"{col}_sd")
        if value is None or pd.isna(value):
            return "–"
        spread = sd is not None and pd.notna(sd) and row["seeds"] > 1 and row["method"] != REFERENCE_METHOD
        return f"{100 * value:.1f} ± {100 * sd:.1f}" if spread else f"{100 * value:.1f}"

    out = pd.DataFrame({
        "method": table["method"], "variant": table["variant"], "weights": table["point"],
        "α": table["alpha"].where(table["method"] != REFERENCE_METHOD, "0"),
        "seeds": table["seeds"].astype(int),
        f"ID {id_domain}": [acc(r, "id") for _, r in table.iterrows()],
        "OOD avg": [acc(r, OOD_AVERAGE) for _, r in table.iterrows()],
    })
    for d in ood:
        out[d] = [acc(r, d) for _, r in table.iterrows()]
    out["trainable"] = [_count(v) for v in table["trainable_params"]]
    trained = table["method"] != REFERENCE_METHOD  # the reference is not trained: no checkpoint, no time
    out["checkpoint"] = [_bytes(v) if t else "–" for v, t in zip(table["checkpoint_bytes"], trained)]
    out["train time"] = [_seconds(v) if t else "–" for v, t in zip(table["train_seconds"], trained)]
    return out


def _count(value) -> str:
    if value is None or pd.isna(value):
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _bytes(value) -> str:
    if value is None or pd.isna(value):
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _seconds(value) -> str:
    if value is None or pd.isna(value):
        return "–"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"


def leaderboard_text(table: pd.DataFrame) -> str:
    """The leaderboard as a plain-text table for the terminal."""
    shown = leaderboard_display(table)
    if shown.empty:
        return "(no runs in the summary)\n"
    return plain_table(shown)


def plain_table(shown: pd.DataFrame, text_cols: Iterable[str] = ("method", "variant", "weights")) -> str:
    """A display table as aligned plain text: text columns left, numbers right."""
    text_cols = set(text_cols)
    cells = [list(map(str, shown.columns))] + [[str(v) for v in row] for row in shown.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(row):
        return "  ".join(c.ljust(w) if shown.columns[i] in text_cols else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])]) + "\n"


def leaderboards_text(summary: pd.DataFrame, ood_domains: Sequence[str] | None = None) -> str:
    """Every study's leaderboard (a heading each where there are several), then the across-backbone tables."""
    boards = leaderboards(summary, ood_domains)
    if len(boards) == 1:
        return leaderboard_text(next(iter(boards.values())))
    parts = [f"== {study}\n{leaderboard_text(table)}" for study, table in boards.items()]
    across = backbone_leaderboard_display(backbone_leaderboard(summary))
    for dataset, shown in across.items():
        if len(shown.columns) > 3:  # several backbones
            parts.append(f"== {dataset}: across backbones (variant and α chosen on ID val)\n{plain_table(shown)}")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- 3. calibration (absent classes)
def has_absent_classes(summary: pd.DataFrame, curves: pd.DataFrame | None = None) -> bool:
    """Whether any run evaluated classes absent from its fine-tuning data."""
    absent = pd.to_numeric(summary.get("n_absent"), errors="coerce").fillna(0)
    return bool((absent > 0).any()) or (curves is not None and not curves.empty)


def calibration_chart(summary: pd.DataFrame, curves: pd.DataFrame, ood_domains: Sequence[str] | None = None,
                      interpolation: str = "linear") -> alt.TopLevelMixin:
    """Seen- vs absent-class accuracy over the logit offset γ (ID test, α = 1) above the accuracy before and after
    the chosen γ; one block per study with absent classes."""
    title = "Logit-scale calibration for classes absent from fine-tuning"
    curves = curves if curves is not None else pd.DataFrame()
    blocks = []
    studies = studies_of(summary)
    for study in studies:
        rows = study_rows(summary, study)
        own = curves if curves.empty or "study" not in curves else curves[curves["study"] == study]
        if has_absent_classes(rows, own if len(studies) > 1 else curves):
            heading = f"{title}: {study}" if len(studies) > 1 else title
            tag = f"_{len(blocks)}" if blocks else ""
            blocks.append(_calibration_block(rows, own, ood_domains, interpolation, heading, tag))
    if not blocks:
        return _themed(_note("No run has classes absent from its fine-tuning data: nothing to calibrate.", title))
    return _themed(_stack(blocks))


def _calibration_block(summary: pd.DataFrame, curves: pd.DataFrame, ood_domains: Sequence[str] | None,
                       interpolation: str, title: str, tag: str = "") -> alt.TopLevelMixin:
    id_domain = id_domain_of(summary)
    colour = method_colours(summary["method"].unique())
    absent_runs = summary[pd.to_numeric(summary["n_absent"], errors="coerce").fillna(0) > 0][
        ["method", "variant"]].drop_duplicates()
    dashes = variant_dashes(absent_runs["variant"])
    charts = []
    curve = curves if curves is not None else pd.DataFrame()
    if not curve.empty:
        top = curve.groupby(["method", "variant", "seed"])["alpha"].transform("max")
        curve = curve[(curve["split"] == "test") & (curve["eval_domain"] == id_domain) & (curve["alpha"] == top)
                      & (curve["interpolation"] == interpolation)].copy()
    if not curve.empty:
        curve["series"] = [series_label(m, v) for m, v in zip(curve["method"], curve["variant"])]
        curve["run"] = curve["series"] + " seed " + curve["seed"].astype(str)
        curve = _thin(curve, ["run"], 400, order="gamma")
        chosen = summary[(summary["interpolation"] == interpolation) & (summary["eval_domain"] == id_domain)
                         & (summary["split"] == "test")]
        chosen = chosen[(chosen["alpha"] == chosen.groupby(["method", "variant", "seed"])["alpha"].transform("max"))
                        & (pd.to_numeric(chosen["n_absent"], errors="coerce").fillna(0) > 0)].copy()
        chosen["series"] = [series_label(m, v) for m, v in zip(chosen["method"], chosen["variant"])]
        chosen["calibration_label"] = chosen["calibration"].map(lambda c: CALIBRATION_LABELS.get(c, c))
        axis = dict(format=".1~%", tickCount=5, tickMinStep=0.01)
        legend = _method_legend(curve["method"])
        lines = (alt.Chart(curve).mark_line(strokeWidth=2).properties(name=f"calibration_curves{tag}")
                 .encode(x=alt.X("seen_accuracy:Q", title="seen-class accuracy", axis=alt.Axis(**axis)),
                         y=alt.Y("absent_accuracy:Q", title="absent-class accuracy", axis=alt.Axis(**axis)),
                         order="gamma:Q", detail="run:N",
                         color=alt.Color("method:N", scale=colour, title="method", legend=legend),
                         strokeDash=_dash(dashes),
                         tooltip=["series:N", "seed:Q", alt.Tooltip("gamma:Q", format=".3f"),
                                  alt.Tooltip("seen_accuracy:Q", format=".2%"),
                                  alt.Tooltip("absent_accuracy:Q", format=".2%"),
                                  alt.Tooltip("ausuc:Q", title="AUSUC", format=".3f")]))
        dots = (alt.Chart(chosen).mark_point(filled=True, size=110, stroke="white", strokeWidth=0.8)
                .properties(name=f"calibration_chosen{tag}")
                .encode(x="seen_accuracy:Q", y="absent_accuracy:Q",
                        color=alt.Color("method:N", scale=colour, title="method", legend=legend),
                        shape=alt.Shape("calibration_label:N", title="γ chosen by",
                                        scale=alt.Scale(domain=[CALIBRATION_LABELS[c] for c in CALIBRATIONS],
                                                        range=["circle", "triangle-up", "square"])),
                        tooltip=["series:N", "seed:Q", alt.Tooltip("calibration_label:N", title="calibration"),
                                 alt.Tooltip("gamma:Q", format=".3f"), alt.Tooltip("accuracy:Q", format=".2%"),
                                 alt.Tooltip("seen_accuracy:Q", format=".2%"),
                                 alt.Tooltip("absent_accuracy:Q", format=".2%")]))
        charts.append(alt.layer(lines, dots).properties(
            width=300, height=300,
            title=alt.Title(f"Seen vs absent classes over γ ({id_domain} test, α = 1)",
                            subtitle="γ is added to absent-class logits; marks: γ chosen by ALG / PCV, and γ = 0")))
    charts.append(_calibration_gain(summary, absent_runs, ood_domains, colour, dashes, interpolation, tag))
    # stacked, not side by side: the gain panels alone are as wide as a page
    return alt.vconcat(*charts, spacing=30, title=alt.Title(title)).resolve_scale(color="shared", shape="independent")


def _calibration_gain(summary, absent_runs, ood_domains, colour, dashes, interpolation, tag="") -> alt.FacetChart:
    """Accuracy (all, seen, absent classes) with no calibration, ALG and PCV at alpha = 1, per eval domain."""
    id_domain = id_domain_of(summary)
    domains = [id_domain, *ood_domains_of(summary, ood_domains), OOD_AVERAGE]
    rows = summary[(summary["interpolation"] == interpolation) & (summary["split"] == "test")
                   & summary["eval_domain"].isin(domains)]
    rows = rows.merge(absent_runs, on=["method", "variant"])
    rows = rows[rows["alpha"] == rows.groupby(["method", "variant", "seed"])["alpha"].transform("max")]
    long = rows.melt(id_vars=["method", "variant", "seed", "eval_domain", "calibration"],
                     value_vars=["accuracy", "seen_accuracy", "absent_accuracy"], var_name="measure",
                     value_name="value").dropna(subset=["value"])
    long = (long.groupby(["method", "variant", "eval_domain", "calibration", "measure"])["value"]
            .agg(["mean", "std", "count"]).reset_index())
    long["series"] = [series_label(m, v) for m, v in zip(long["method"], long["variant"])]
    long["calibration_label"] = long["calibration"].map(lambda c: CALIBRATION_LABELS.get(c, c))
    long["measure"] = long["measure"].map({"accuracy": "all classes", "seen_accuracy": "seen classes",
                                           "absent_accuracy": "absent classes"})
    long["domain"] = long["eval_domain"].map(lambda d: f"{d} (ID)" if d == id_domain else _domain_label(d))
    domain_order = [f"{id_domain} (ID)" if d == id_domain else _domain_label(d) for d in domains]
    cal_order = [CALIBRATION_LABELS[c] for c in CALIBRATIONS if c in set(long["calibration"])]
    base = alt.Chart().encode(
        x=alt.X("calibration_label:N", sort=cal_order, title=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("mean:Q", title=None, axis=alt.Axis(format=".1~%", tickCount=4, tickMinStep=0.01),
                scale=alt.Scale(zero=False)),
        color=alt.Color("method:N", scale=colour, title="method", legend=_method_legend(long["method"])),
        detail="series:N")
    tooltip = ["series:N", "domain:N", "measure:N", alt.Tooltip("calibration_label:N", title="calibration"),
               alt.Tooltip("mean:Q", title="accuracy", format=".2%"), alt.Tooltip("count:Q", title="seeds")]
    lines = base.mark_line(strokeWidth=1.8).properties(name=f"calibration_gain_lines{tag}").encode(
        strokeDash=_dash(dashes))
    dots = base.mark_point(filled=True, size=55).properties(name=f"calibration_gain_points{tag}").encode(tooltip=tooltip)
    return alt.layer(lines, dots, data=long).properties(width=100, height=100).facet(
        row=alt.Row("measure:N", sort=["all classes", "seen classes", "absent classes"], title=None,
                    header=alt.Header(labelAngle=0, labelAlign="left", labelFontWeight="bold")),
        column=alt.Column("domain:N", sort=domain_order, title=None,
                          header=alt.Header(labelFontWeight="bold")),
        title=alt.Title("Accuracy before and after calibration (α = 1)",
                        subtitle="none: raw logits; ALG: γ = average logit gap; PCV: γ from pseudo-absent folds"),
    ).resolve_scale(y="independent")


# ------------------------------------------------------------------------------------------------- 4. heatmap
def accuracy_change(summary: pd.DataFrame, ood_domains: Sequence[str] | None = None,
                    interpolation: str = "linear", calibration: str = "none") -> pd.DataFrame:
    """Per method/variant and domain (ID test, each OOD domain, OOD average): seed-mean accuracy at alpha = 1 and
    its change from the reference model (same domain), in accuracy points (fractions)."""
    rows = _base(summary, interpolation, calibration)
    id_domain = id_domain_of(summary)
    domains = [id_domain, *ood_domains_of(summary, ood_domains), OOD_AVERAGE]
    rows = rows[rows["eval_domain"].isin(domains)]
    top = rows[rows["alpha"] == rows.groupby(["method", "variant", "seed"])["alpha"].transform("max")]
    mean = top.groupby(["method", "variant", "eval_domain"])["accuracy"].mean().reset_index()
    if (summary["method"] == REFERENCE_METHOD).any():
        ref = mean[mean["method"] == REFERENCE_METHOD].groupby("eval_domain")["accuracy"].mean()
    else:  # no reference run: alpha = 0 of every run is the reference model
        zero = rows[rows["alpha"] == rows["alpha"].min()]
        ref = zero.groupby("eval_domain")["accuracy"].mean()
    out = mean[mean["method"] != REFERENCE_METHOD].copy()
    out["reference"] = out["eval_domain"].map(ref)
    out["change"] = out["accuracy"] - out["reference"]
    out["series"] = [series_label(m, v) for m, v in zip(out["method"], out["variant"])]
    out["domain"] = out["eval_domain"].map(lambda d: f"{d} (ID)" if d == id_domain else _domain_label(d))
    out.attrs["domain_order"] = [f"{id_domain} (ID)" if d == id_domain else _domain_label(d) for d in domains]
    return out.reset_index(drop=True)


def accuracy_change_chart(summary: pd.DataFrame, ood_domains: Sequence[str] | None = None) -> alt.TopLevelMixin:
    """Heatmap methods × domains: change in test accuracy from the reference model at alpha = 1, labelled; one
    heatmap per study."""
    title = "Change in test accuracy from the reference model (α = 1, no calibration)"
    studies = studies_of(summary)
    blocks = []
    for study in studies:
        block = _accuracy_change_block(study_rows(summary, study), ood_domains,
                                       f"{title}: {study}" if len(studies) > 1 else title,
                                       f"_{len(blocks)}" if blocks else "")
        if block is not None:
            blocks.append(block)
    if not blocks:
        return _themed(_note("No fine-tuned runs in the summary.", title))
    return _themed(_stack(blocks).resolve_scale(color="independent") if len(blocks) > 1 else blocks[0])


def _accuracy_change_block(summary: pd.DataFrame, ood_domains: Sequence[str] | None, title: str, tag: str = ""
                           ) -> alt.TopLevelMixin | None:
    data = accuracy_change(summary, ood_domains)
    if data.empty:
        return None
    data["change_pp"] = 100 * data["change"]
    limit = max(1.0, float(np.nanmax(np.abs(data["change_pp"])))) if data["change_pp"].notna().any() else 1.0
    order = []
    for m in method_order(data["method"]):
        order += sorted(data.loc[data["method"] == m, "series"].unique(), key=lambda s: (s != m, s))
    ref = data.drop_duplicates("domain").set_index("domain")["reference"]
    ref_text = ", ".join(f"{d} {100 * ref[d]:.1f}%" for d in data.attrs["domain_order"]
                         if d in ref and pd.notna(ref[d]))
    base = alt.Chart(data).encode(
        x=alt.X("domain:N", sort=data.attrs["domain_order"], title=None,
                axis=alt.Axis(orient="top", labelAngle=0, labelFontWeight="bold", domain=False, ticks=False)),
        y=alt.Y("series:N", sort=order, title=None, axis=alt.Axis(domain=False, ticks=False, labelFontSize=12)))
    cells = base.mark_rect(stroke="white", strokeWidth=1.5).properties(name=f"heat_cells{tag}").encode(
        color=alt.Color("change_pp:Q", title="Δ accuracy (points)",
                        scale=alt.Scale(scheme="redblue", domain=[-limit, limit], domainMid=0),
                        legend=alt.Legend(orient="right", gradientLength=160, format="+.0f")),
        tooltip=[alt.Tooltip("series:N", title="method"), "domain:N",
                 alt.Tooltip("accuracy:Q", title="accuracy", format=".2%"),
                 alt.Tooltip("reference:Q", title="reference", format=".2%"),
                 alt.Tooltip("change_pp:Q", title="Δ (points)", format="+.2f")])
    labels = base.mark_text(fontSize=12).properties(name=f"heat_labels{tag}").encode(
        text=alt.Text("change_pp:Q", format="+.1f"),
        color=alt.condition(f"abs(datum.change_pp) > {0.6 * limit}", alt.value("white"), alt.value("#222")))
    n_rows, n_cols = len(order), len(data.attrs["domain_order"])
    chart = alt.layer(cells, labels).properties(
        width=max(300, 95 * n_cols), height=max(60, 30 * n_rows),
        title=alt.Title(title, subtitle=f"Reference accuracy: {ref_text}. Blue: better than the reference; "
                                        "red: worse."))
    return chart


# ------------------------------------------------------------------------------------------- 5. training curves
def training_curves(logs: pd.DataFrame, max_points: int = 400) -> pd.DataFrame:
    """Train logs (one row per step, ``method``/``variant``/``seed`` columns added) in long form: one row per
    (run, step, measure) for the total loss, each ``loss_<term>`` column and ID validation accuracy."""
    if logs is None or logs.empty or "step" not in logs:
        return pd.DataFrame(columns=["method", "variant", "seed", "series", "run", "step", "measure", "value"])
    terms = [c for c in logs.columns if c == "loss" or c.startswith("loss_")]
    measures = {"loss": "loss (total)", **{t: f"loss: {t[5:]}" for t in terms if t != "loss"}}
    if "val_accuracy" in logs:
        measures["val_accuracy"] = "ID val accuracy"
    ids = ["method", "variant", "seed", "step", *(["study"] if "study" in logs else [])]
    long = logs.melt(id_vars=ids, value_vars=list(measures), var_name="column",
                     value_name="value").dropna(subset=["value"])
    long["measure"] = long["column"].map(measures)
    long["series"] = [series_label(m, v) for m, v in zip(long["method"], long["variant"])]
    long["run"] = long["series"] + " seed " + long["seed"].astype(str)
    if "study" in long and long["study"].nunique() > 1:  # the same run names in several studies
        long["run"] = long["study"].astype(str) + ": " + long["run"]
    long = _thin(long, ["run", "measure"], max_points, order="step")
    long.attrs["measure_order"] = list(measures.values())
    return long.drop(columns="column").reset_index(drop=True)


def training_curves_chart(logs: pd.DataFrame, methods: Iterable[str] | None = None, columns: int = 3,
                          max_points: int = 400) -> alt.TopLevelMixin:
    """Loss terms and ID validation accuracy vs step, one panel per measure, one line per run."""
    data = training_curves(logs, max_points)
    title = "Training curves"
    if data.empty:
        return _themed(_note("No training logs (only the reference model, which is not trained).", title))
    order = data.attrs["measure_order"]
    colour = method_colours(set(methods or []) | set(data["method"]))
    dashes = variant_dashes(data["variant"])
    highlight = alt.selection_point(fields=["method"], bind="legend", name="pick_run")
    tooltip = [alt.Tooltip("run:N"), "measure:N", "step:Q", alt.Tooltip("value:Q", format=".4g")]
    panels = []
    for measure in order:
        rows = data[data["measure"] == measure]
        base = alt.Chart(rows).encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False),
                    axis=alt.Axis(format=".1~%", tickMinStep=0.01) if measure == "ID val accuracy" else alt.Axis()),
            color=alt.Color("method:N", scale=colour, title="method", legend=_method_legend(data["method"])),
            opacity=alt.condition(highlight, alt.value(0.95), alt.value(0.08)))
        lines = base.mark_line(strokeWidth=1.6).properties(name="train_lines").encode(
            detail="run:N", tooltip=tooltip,
            strokeDash=_dash(dashes))
        if not panels:  # one definition; the other panels only read it
            lines = lines.add_params(highlight)
        layers = [lines]
        if measure == "ID val accuracy":  # a few points (epoch ends): mark each
            layers.append(base.mark_point(filled=True, size=36).properties(name="val_points").encode(tooltip=tooltip))
        panels.append(alt.layer(*layers).properties(width=250, height=170, title=alt.Title(measure, fontSize=13)))
    chart = alt.concat(*panels, columns=min(columns, len(panels)), title=alt.Title(
        title, subtitle="Per-step loss terms and ID validation accuracy (points at epoch ends), one line per run.")
    ).resolve_scale(color="shared", strokeDash="shared")
    return _themed(chart)


def _thin(frame: pd.DataFrame, keys: list[str], max_points: int, order: str) -> pd.DataFrame:
    """At most ``max_points`` rows per group (evenly spaced, keeping the last), so pages stay small."""
    parts = []
    for _, group in frame.sort_values([*keys, order]).groupby(keys, sort=False):
        if len(group) > max_points:
            idx = np.unique(np.linspace(0, len(group) - 1, max_points).round().astype(int))
            group = group.iloc[idx]
        parts.append(group)
    return pd.concat(parts) if parts else frame


# ------------------------------------------------------------------------------------------- 6. per-class damage
#: Classes the per-class heatmap shows per study at most: those that lost most under any method.
PER_CLASS_MAX_CLASSES = 24


def per_class_damage(table: pd.DataFrame, max_classes: int = PER_CLASS_MAX_CLASSES) -> pd.DataFrame:
    """The per-class table (robustft.per_class) at the chosen alpha, seed means per (study, series, domain, class),
    restricted per study to the ``max_classes`` classes with the largest loss under any series."""
    columns = ["study", "series", "method", "variant", "eval_domain", "class_name", "delta", "reference_accuracy",
               "accuracy", "alpha", "n_seeds"]
    if table is None or table.empty:
        return pd.DataFrame(columns=columns)
    rows = table[table["point"] == "chosen"]
    data = (rows.groupby(["study", "method", "variant", "eval_domain", "class_index", "class_name"], as_index=False,
                         sort=False)
            .agg(delta=("delta", "mean"), reference_accuracy=("reference_accuracy", "mean"),
                 accuracy=("accuracy", "mean"), alpha=("alpha", "mean"), n_seeds=("seed", "nunique")))
    data["series"] = [series_label(m, v) for m, v in zip(data["method"], data["variant"])]
    keep = []
    for _, block in data.groupby("study", sort=False):
        worst = block.groupby("class_name")["delta"].min().sort_values(kind="stable")
        keep.append(block[block["class_name"].isin(worst.index[:max_classes])])
    return pd.concat(keep, ignore_index=True)[columns] if keep else pd.DataFrame(columns=columns)


def per_class_damage_chart(table: pd.DataFrame | None) -> alt.TopLevelMixin:
    """Heatmap classes x methods, one panel per test domain: the change in each class's accuracy from the reference
    model at the alpha chosen on ID validation (seed mean, no calibration); one block per study."""
    title = "Per-class change in test accuracy from the reference model (chosen α, no calibration)"
    data = per_class_damage(table)
    if data.empty:
        return _themed(_note("No per-class table (no fine-tuned runs).", title))
    blocks = []
    studies = list(pd.unique(data["study"]))
    for study in studies:
        block = data[data["study"] == study].assign(delta_pp=lambda d: 100 * d["delta"])
        tag = f"_{len(blocks)}" if blocks else ""
        limit = max(1.0, float(np.nanmax(np.abs(block["delta_pp"])))) if block["delta_pp"].notna().any() else 1.0
        order = []
        for m in method_order(block["method"]):
            order += sorted(block.loc[block["method"] == m, "series"].unique(), key=lambda s: (s != m, s))
        classes = list(block.sort_values("delta")["class_name"].drop_duplicates())
        domains = list(pd.unique(block["eval_domain"]))
        width = max(120, 22 * len(classes))
        columns = max(1, min(len(domains), 1000 // (width + 40)))
        chart = alt.Chart(block).mark_rect(stroke="white", strokeWidth=1).properties(
            name=f"per_class_cells{tag}", width=width, height=max(60, 18 * len(order))).encode(
            x=alt.X("class_name:N", sort=classes, title=None, axis=alt.Axis(labelAngle=-45, labelLimit=110)),
            y=alt.Y("series:N", sort=order, title=None, axis=alt.Axis(labelLimit=180)),
            color=alt.Color("delta_pp:Q", title="Δ accuracy (points)",
                            scale=alt.Scale(scheme="redblue", domain=[-limit, limit], domainMid=0),
                            legend=alt.Legend(orient="right", gradientLength=140, format="+.0f")),
            tooltip=[alt.Tooltip("series:N", title="method"), alt.Tooltip("eval_domain:N", title="domain"),
                     alt.Tooltip("class_name:N", title="class"),
                     alt.Tooltip("reference_accuracy:Q", title="reference", format=".1%"),
                     alt.Tooltip("accuracy:Q", title="accuracy", format=".1%"),
                     alt.Tooltip("delta_pp:Q", title="Δ (points)", format="+.1f"),
                     alt.Tooltip("alpha:Q", title="chosen α (mean)", format=".2f"), "n_seeds:Q"],
        ).facet(facet=alt.Facet("eval_domain:N", sort=domains, title=None,
                                header=alt.Header(labelFontWeight="bold")), columns=columns).properties(
            title=alt.Title(f"{title}: {study}" if len(studies) > 1 else title,
                            subtitle="Blue: the class gained; red: it lost. The classes that lost most under any "
                                     "method, at most %d." % PER_CLASS_MAX_CLASSES))
        blocks.append(chart)
    return _themed(_stack(blocks).resolve_scale(color="independent") if len(blocks) > 1 else blocks[0])
