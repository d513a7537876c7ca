"""The report: tables from a synthetic summary, files on disk, and the page rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustft.io.tables import write_table
from robustft.report import CHART_NAMES, charts as C
from robustft.report.page import print_leaderboard, report_files, write_report

CHROMIUM = "/usr/bin/chromium"
ID, OOD = "photo", ["art_painting", "cartoon", "sketch"]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
SEEDS = [0, 1]
#: (method, variant) -> (ID gain at alpha 1, OOD gain at alpha 1, OOD bump at alpha 0.5); plus the reference.
TRAINED = {("full_ft", "default"): (0.15, -0.04, 0.10), ("l2sp", "default"): (0.13, 0.01, 0.07),
           ("kd", "default"): (0.12, 0.02, 0.05), ("full_ft", "absent3"): (0.10, -0.08, 0.06)}
ABSENT_RUN = ("full_ft", "absent3")
REF_ACC = {ID: 0.80, "art_painting": 0.62, "cartoon": 0.55, "sketch": 0.38}
CONFIG = {
    "dataset": {"name": "pacs", "id_domain": ID, "ood_domains": OOD, "max_per_class": {"train": 40, "val": 10,
                                                                                       "test": 25}},
    # as the validated config holds it: open_clip's defaults (model, pretrained) are filled in for every backbone
    "backbone": {"name": "efficientnet_lite0", "image_size": 128, "weights": None, "model": "ViT-B-32",
                 "pretrained": "openai", "model_config": None},
    "methods": {"zeroshot": {"default": {}}, "full_ft": {"default": {}, "absent3": {
        "protocol": {"kind": "class_subset", "absent_classes": ["giraffe", "guitar", "house"]}}},
                "l2sp": {"default": {"encoder_strength": 0.1}}, "kd": {"default": {"kd_weight": 0.5}}},
    "seeds": SEEDS, "sweep": {"alphas": ALPHAS}, "report": {"title": "robustft synthetic report"},
}


# ------------------------------------------------------------------------------------------------ synthetic data
#: The study of the single-study report: the embedded default's dataset and backbone.
STUDY = {"study": "pacs/efficientnet_lite0-imagenet-128px", "dataset": "pacs",
         "backbone": "efficientnet_lite0-imagenet-128px", "id_domain": ID, "ood_domains": OOD}
N = 100  # examples per split: every synthetic accuracy (two decimals) is exact


def _accuracy(method, variant, seed, domain, alpha, calibration, rng, trained=TRAINED, ref_acc=REF_ACC, offset=0.0):
    ref = ref_acc[domain] + offset
    if method == "zeroshot":
        return ref
    id_gain, ood_gain, bump = trained[(method, variant)]
    end = ref + (id_gain if domain in (ID, "real") else ood_gain)
    acc = (1 - alpha) * ref + alpha * end + (0 if domain in (ID, "real") else bump * 4 * alpha * (1 - alpha))
    acc += 0.01 * alpha * rng.standard_normal() + 0.004 * seed
    if calibration == "alg":
        acc += 0.02 * alpha
    if calibration == "pcv":
        acc += 0.03 * alpha
    return float(np.clip(acc, 0, 1))


def _metric_row(acc: float, **fields) -> dict:
    hits = int(round(acc * N))
    correct = np.zeros(N, np.uint8)
    correct[:hits] = 1
    return {"n": N, "accuracy": hits / N, "accuracy_ci_low": max(0.0, hits / N - 0.03),
            "accuracy_ci_high": min(1.0, hits / N + 0.03), "correct": correct.tobytes(), "interpolation": "linear",
            **fields}


def make_results(root: Path, studies=(STUDY,), trained=TRAINED, ref_acc=REF_ACC, offsets=None) -> dict:
    """Per run metrics.parquet, run.json, a calibration curve and a train log shaped like the pipeline's, under
    ``root/results``, and the summary made from them by ``summary_stage``."""
    from robustft.pipeline.analysis import summary_stage

    rng = np.random.default_rng(0)
    runs = [("zeroshot", "default")] + list(trained)
    metric_paths, run_paths, run_studies, curve_paths, log_paths = [], [], [], [], []
    for study in studies:
        offset = (offsets or {}).get(study["study"], 0.0)
        domains = [(study["id_domain"], "val"), (study["id_domain"], "test")] + [(d, "test") for d in study["ood_domains"]]
        for method, variant in runs:
            for seed in SEEDS:
                absent = (method, variant) == ABSENT_RUN
                cals = ["none", "alg", "pcv"] if absent else ["none"]
                run_dir = root / "results" / study["study"] / "runs" / method / variant / f"seed{seed}"
                run_dir.mkdir(parents=True)
                rows = []
                for alpha in ALPHAS:
                    for cal in cals:
                        gamma = {"none": 0.0, "alg": 1.3, "pcv": 1.8}[cal]
                        for domain, split in domains:
                            acc = _accuracy(method, variant, seed, domain, alpha, cal, rng, trained, ref_acc, offset)
                            if split == "val":
                                acc = float(np.clip(acc - 2.0 * (alpha - 0.75) ** 2, 0, 1))  # ID val prefers 0.75
                            absent_acc = 1 / (1 + np.exp(-(gamma - 1.5 + 0.1 * seed))) if absent else np.nan
                            seen = 0.95 - 0.9 * absent_acc ** 3 if absent and split != "val" else acc
                            rows.append(_metric_row(
                                acc, method=method, variant=variant, seed=seed, eval_domain=domain, split=split,
                                alpha=alpha, calibration=cal, gamma=gamma, seen_accuracy=seen,
                                absent_accuracy=absent_acc, n_seen=57 if absent else N, n_absent=43 if absent else 0,
                                ausuc=0.4 if absent else np.nan))
                write_table(run_dir / "metrics.parquet", pd.DataFrame(rows))
                trainable = 0 if method == "zeroshot" else 3_400_000
                (run_dir / "run.json").write_text(json.dumps({
                    "method": method, "variant": variant, "seed": seed,
                    "protocol": {"kind": "class_subset" if absent else "full"},
                    "trainable_parameters": trainable, "total_parameters": 3_400_000,
                    "checkpoint": {"size_bytes": 13_600_000 if trainable else 0},
                    "wall_time_s": 95.0 if trainable else 0.0}))
                metric_paths.append(str(run_dir / "metrics.parquet"))
                run_paths.append(str(run_dir / "run.json"))
                run_studies.append(study["study"])
                curve = pd.DataFrame(columns=["gamma", "seen_accuracy", "absent_accuracy", "accuracy", "eval_domain",
                                              "split", "alpha", "interpolation", "ausuc", "method", "variant", "seed"])
                if absent:
                    gammas = np.linspace(-1, 5, 40)
                    parts = []
                    for domain, split in domains:
                        for alpha in ALPHAS:
                            absent_acc = 1 / (1 + np.exp(-(gammas - 1.5 + 0.1 * seed)))
                            seen_acc = 0.95 - 0.9 * absent_acc ** 3
                            parts.append(pd.DataFrame({
                                "gamma": gammas, "seen_accuracy": seen_acc, "absent_accuracy": absent_acc,
                                "accuracy": (seen_acc * 57 + absent_acc * 43) / 100, "eval_domain": domain,
                                "split": split, "alpha": alpha, "interpolation": "linear", "ausuc": 0.4,
                                "method": method, "variant": variant, "seed": seed}))
                    curve = pd.concat(parts, ignore_index=True)
                write_table(run_dir / "calibration_curve.parquet", curve)
                curve_paths.append(run_dir / "calibration_curve.parquet")
                log_paths.append(run_dir / "train_log.parquet")
                write_table(log_paths[-1], _train_log(method, seed, rng))
    per_class = [_per_class_table(root, study, trained) for study in studies]
    summary = root / "results" / "summary.parquet"
    by_name = {s["study"]: s for s in studies}
    summary_stage(metrics=metric_paths, runs=run_paths, studies=[by_name[s] for s in run_studies], bootstrap=20,
                  ci_level=0.95, out=str(summary))
    return {"summary": summary, "curves": curve_paths, "logs": log_paths, "run_studies": run_studies,
            "per_class": per_class}


def _per_class_table(root: Path, study: dict, trained) -> Path:
    """A study's per-class table (robustft.per_class) shaped like the pipeline's: 7 classes, every test domain."""
    from robustft.per_class import PER_CLASS_COLUMNS

    rows = []
    for m, (method, variant) in enumerate(trained):
        for seed in SEEDS:
            for domain in [study["id_domain"], *study["ood_domains"]]:
                for c, name in enumerate(["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]):
                    delta = 0.05 * ((c + m + seed) % 5 - 2)
                    for point, alpha in (("fine-tuned", 1.0), ("chosen", 0.75)):
                        rows.append({"study": study["study"], "method": method, "variant": variant, "seed": seed,
                                     "eval_domain": domain, "split": "test", "class_index": c, "class_name": name,
                                     "n": 20, "point": point, "alpha": alpha, "reference_accuracy": 0.7,
                                     "accuracy": 0.7 + delta, "delta": delta})
    path = root / "results" / study["study"] / "per_class.parquet"
    write_table(path, pd.DataFrame(rows, columns=list(PER_CLASS_COLUMNS)))
    return path


def _train_log(method: str, seed: int, rng) -> pd.DataFrame:
    columns = ["step", "epoch", "lr", "loss_ce", "loss", "grad_norm", "samples_per_s", "val_accuracy"]
    if method == "zeroshot":
        return pd.DataFrame(columns=columns)
    steps = np.arange(1, 41)
    ce = 1.9 * np.exp(-steps / 12) + 0.2 + 0.05 * rng.standard_normal(len(steps))
    frame = pd.DataFrame({"step": steps, "epoch": (steps - 1) // 10, "lr": 1e-4, "loss_ce": ce})
    if method == "l2sp":
        frame["loss_l2sp"] = 0.002 * np.sqrt(steps)
    if method == "kd":
        frame["loss_kd"] = 0.5 * np.exp(-steps / 20)
    frame["loss"] = frame[[c for c in frame if c.startswith("loss_")]].sum(axis=1)
    frame["grad_norm"], frame["samples_per_s"] = 1.0, 120.0
    rate = {"full_ft": 0.005, "l2sp": 0.004, "kd": 0.003}[method]
    frame["val_accuracy"] = np.where(steps % 10 == 0, 0.8 + rate * steps + 0.01 * seed, np.nan)
    return frame


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_results(root)
    out = root / "results" / "report"
    written = write_report(inputs["summary"], inputs["curves"], inputs["logs"], CONFIG, out, png_scale=1.0,
                           per_class_paths=inputs["per_class"])
    return {"root": root, "out": out, "written": written, **inputs,
            "summary_frame": pd.read_parquet(inputs["summary"])}


# ------------------------------------------------------------------------------------------------------ tables
def test_id_vs_ood_points_follow_the_data(report):
    summary = report["summary_frame"]
    points = C.id_vs_ood_points(summary, OOD)
    panels = [*OOD, "ood_average"]
    assert list(pd.unique(points["panel"])) == panels
    trained = points[points["method"] != "zeroshot"]
    assert len(trained) == len(TRAINED) * len(ALPHAS) * len(panels)
    assert len(points[points["method"] == "zeroshot"]) == len(panels)  # the reference once per panel
    assert (points["n_seeds"] == len(SEEDS)).all() and (points["error"] == "±1 s.d. over seeds").all()
    row = points[(points["method"] == "l2sp") & (points["alpha"] == 0.5) & (points["panel"] == "sketch")].iloc[0]
    raw = summary[(summary["method"] == "l2sp") & (summary["alpha"] == 0.5) & (summary["calibration"] == "none")]
    assert row["ood_acc"] == pytest.approx(raw[raw["eval_domain"] == "sketch"]["accuracy"].mean())
    assert row["id_acc"] == pytest.approx(raw[(raw["eval_domain"] == ID) & (raw["split"] == "test")]["accuracy"].mean())
    sd = raw[raw["eval_domain"] == "sketch"]["accuracy"].std()
    assert row["ood_hi"] - row["ood_lo"] == pytest.approx(2 * sd)
    chosen = trained[trained["selected"]]
    assert len(chosen) == len(TRAINED) * len(panels) and set(chosen["alpha"]) == {0.75}
    assert set(points.loc[points["alpha"] == 1, "kind"]) == {C.POINT_KINDS[2]}


def test_leaderboard_and_terminal_table(report, capsys):
    table = C.leaderboard(report["summary_frame"], OOD)
    assert table.iloc[0]["method"] == "zeroshot" and (table["method"] == "zeroshot").sum() == 1
    assert len(table) == 1 + 2 * len(TRAINED)
    assert {"id", "ood_average", *OOD, "trainable_params", "checkpoint_bytes", "train_seconds"} <= set(table)
    chosen = table[table["point"].str.contains("chosen")]
    assert (chosen["alpha"] == "0.75").all()
    ranked = chosen["ood_average"].tolist()
    assert ranked == sorted(ranked, reverse=True)
    ref = table.iloc[0]
    assert ref["id"] == pytest.approx(REF_ACC[ID]) and ref["sketch"] == pytest.approx(REF_ACC["sketch"])
    text = (report["out"] / "leaderboard.txt").read_text()
    assert text == C.leaderboard_text(table)
    print_leaderboard(report["out"] / "leaderboard.txt")
    shown = capsys.readouterr().out
    assert "leaderboard" in shown and "l2sp" in shown and "ID photo" in shown and "±" in shown
    print_leaderboard(report["summary"], ood_domains=OOD)
    assert capsys.readouterr().out == shown


def test_accuracy_change_is_relative_to_the_reference(report):
    change = C.accuracy_change(report["summary_frame"], OOD)
    assert len(change) == len(TRAINED) * (2 + len(OOD))
    row = change[(change["method"] == "full_ft") & (change["variant"] == "default") & (change["eval_domain"] == ID)]
    assert row["change"].iloc[0] == pytest.approx(0.15 + 0.002, abs=0.02)


def test_training_curves_long_form(report):
    from robustft.report.page import load_train_logs

    logs = load_train_logs(report["logs"])
    assert set(logs["method"]) == {"full_ft", "l2sp", "kd"}  # the reference has an empty log
    long = C.training_curves(logs)
    assert {"loss (total)", "loss: ce", "loss: l2sp", "loss: kd", "ID val accuracy"} == set(long["measure"])
    assert len(long[long["measure"] == "ID val accuracy"]) == len(TRAINED) * len(SEEDS) * 4


# ------------------------------------------------------------------------------------------------------- files
def test_files_exist_and_json_is_vega_lite(report):
    out = report["out"]
    expected = report_files(out)
    assert sorted(map(str, report["written"].values())) == sorted(expected)
    for path in map(Path, expected):
        assert path.is_file() and path.stat().st_size > 0, path
    import altair as alt
    import jsonschema

    schema = json.loads(Path(alt.__file__).with_name("vegalite").joinpath(
        "v6", "schema", "vega-lite-schema.json").read_text())
    for name in CHART_NAMES:
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        spec = json.loads((out / f"{name}.vl.json").read_text())
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        jsonschema.validate(spec, schema)


def test_page_is_self_contained(report):
    page = (report["out"] / "index.html").read_text()
    tags = re.findall(r"<script\b[^>]*>", page, flags=re.I)
    assert tags and not [t for t in tags if "src" in t.lower()], tags
    assert not re.search(r"<(link|img|iframe)\b[^>]*(src|href)\s*=\s*[\"']?(https?:)?//", page, flags=re.I)
    assert "vegaEmbed" in page and 'id="spec-id_vs_ood"' in page
    assert "<table class=\"leaderboard\">" in page and "linear probe" in page
    assert "efficientnet_lite0" in page and "art_painting, cartoon, sketch" in page


def test_configuration_names_the_backbone_it_ran(report):
    """The configuration table showed EfficientNet-Lite0 as "model ViT-B-32, pretrained openai": the open_clip
    defaults that a validated config carries for every backbone."""
    from robustft.report.page import backbone_description

    page = (report["out"] / "index.html").read_text()
    config_section = page[page.index('id="configuration"'):page.index('id="id_vs_ood"')]
    assert "efficientnet_lite0 (ImageNet-1k weights, 128 px)" in config_section
    assert "ViT-B-32" not in config_section and "openai" not in config_section
    clip = {"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai", "image_size": None, "weights": None}
    assert backbone_description(clip) == "open_clip (ViT-B-32, openai weights, native resolution)"
    assert backbone_description({"name": "efficientnet_lite0", "weights": "/w/lite0.safetensors", "image_size": 96}) \
        == "efficientnet_lite0 (weights lite0.safetensors, 96 px)"


def test_calibration_note_without_absent_classes(report, tmp_path):
    summary = report["summary_frame"]
    summary = summary[summary["variant"] != "absent3"].assign(n_absent=0)
    chart = C.calibration_chart(summary, pd.DataFrame())
    assert chart.to_dict()["mark"]["type"] == "text"


def test_a_crash_mid_write_leaves_no_report_file_under_its_final_name(report, tmp_path, monkeypatch):
    """Every report file is written under a temporary name and renamed: a job killed while a PNG is half written
    leaves no PNG that passes for complete (the chaos test's rule, checked here where a kill cannot aim)."""
    import altair as alt

    def half_written(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(alt.TopLevelMixin, "save", half_written)
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        write_report(report["summary"], report["curves"], report["logs"], CONFIG, out, png_scale=1.0)
    assert not list(out.glob("*.png")), sorted(p.name for p in out.iterdir())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------- browser
class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), stdlib only."""

    def __init__(self, profile: Path, width: int = 1500, height: int = 1000):
        to_browser_r, self._write = os.pipe()
        self._read, from_browser_w = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]
        # the browser reads commands on fd 3 and writes replies on fd 4
        shell = f'exec 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-; exec "$0" "$@"'
        self.proc = subprocess.Popen(["bash", "-c", shell, *args], pass_fds=(to_browser_r, from_browser_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._id, self.events, self.session = b"", 0, [], None
        self.size = (width, height)

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0, session: bool = True) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline):
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)

    def _messages(self, deadline: float):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        return [json.loads(m) for m in messages]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(domain)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.size[0], "height": self.size[1],
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60.0):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"page never satisfied: {expression}")

    def screenshot(self, max_height: int = 12000) -> bytes:
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = min(int(size["height"]) + 1, max_height)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.size[0], "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        return base64.b64decode(data)

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and failed loads seen so far."""
        out = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {params['exceptionDetails'].get('text')} "
                           f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
                out.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                                   for a in params.get("args", [])))
            elif event.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=10)
        except Exception:  # the browser may close the pipe before replying
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


#: Per chart: the named mark layers to count, and the SVG element one datum draws.
_COUNT_MARKS = r"""
(() => {
  const out = {};
  for (const el of document.querySelectorAll("div.chart[data-chart]")) {
    const counts = {};
    for (const group of el.querySelectorAll("svg g.role-mark")) {
      // Vega-Lite may suffix a layer's name with _<n> inside concatenations: strip it
      const name = (Array.from(group.classList).find(c => c.endsWith("_marks")) || "")
        .replace(/(_\d+)+_marks$/, "_marks");
      const items = group.querySelectorAll(":scope > path, :scope > line, :scope > text").length;
      if (name) counts[name] = (counts[name] || 0) + items;
    }
    out[el.dataset.chart] = {status: el.dataset.status, error: el.dataset.error || null,
                             svgs: el.querySelectorAll("svg.marks").length, counts: counts};
  }
  out.__scripts_with_src = Array.from(document.querySelectorAll("script[src]")).map(s => s.src);
  return out;
})()
"""


#: Page and chart geometry: horizontal overflow of the page, each chart's drawn SVG and its box.
_LAYOUT = r"""
(() => {
  const page = document.documentElement;
  const charts = Array.from(document.querySelectorAll("div.chart[data-chart]")).map(el => {
    const svg = el.querySelector("svg.marks");
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0, left: 0, right: 0};
    const style = getComputedStyle(el);
    return {name: el.dataset.chart, client: el.clientWidth, scroll: el.scrollWidth, width: box.width,
            height: box.height, left: box.left, right: box.right,
            visible: style.display !== "none" && style.visibility !== "hidden"};
  });
  return {scroll: page.scrollWidth, client: page.clientWidth, charts: charts};
})()
"""

#: The window width the report must fit without horizontal scrolling (issue #18 item 6).
PAGE_WIDTH = 1400


def render_in_chromium(index: Path, profile: Path) -> dict:
    """Open ``index`` at PAGE_WIDTH px; the marks of each chart, the page geometry, a screenshot, console problems."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)")
    browser = Chromium(profile, width=PAGE_WIDTH)
    try:
        browser.open(index.resolve().as_uri())
        browser.wait_for("document.body && document.body.dataset.charts === 'done'")
        found = browser.evaluate(_COUNT_MARKS)
        layout = browser.evaluate(_LAYOUT)
        shot = browser.screenshot()
        problems = browser.problems()
    finally:
        browser.close()
    return {"found": found, "layout": layout, "shot": shot, "problems": problems}


def assert_fits_and_shows(rendered: dict) -> None:
    """Every chart rendered, drawn with a real size inside the page, no horizontal overflow anywhere."""
    found, layout = rendered["found"], rendered["layout"]
    assert found.pop("__scripts_with_src") == []
    assert not rendered["problems"], rendered["problems"]
    assert set(found) == set(CHART_NAMES)
    for name, chart in found.items():
        assert chart["status"] == "rendered" and chart["svgs"] == 1, (name, chart)
        assert chart["counts"] and all(n > 0 for n in chart["counts"].values()), (name, chart)
    assert layout["scroll"] <= layout["client"], f"the page scrolls sideways at {PAGE_WIDTH} px: {layout}"
    for chart in layout["charts"]:
        assert chart["visible"] and chart["width"] > 200 and chart["height"] > 100, chart
        assert chart["scroll"] <= chart["client"], f"chart {chart['name']} is cut off at {PAGE_WIDTH} px: {chart}"
        assert 0 <= chart["left"] and chart["right"] <= layout["client"], chart


@pytest.mark.browser
def test_page_renders_in_chromium(report, tmp_path):
    rendered = render_in_chromium(report["out"] / "index.html", tmp_path / "profile")
    shot = rendered["shot"]
    (tmp_path / "report.png").write_bytes(shot)
    assert_fits_and_shows(rendered)
    found = rendered["found"]

    # charts against their data
    summary = report["summary_frame"]
    panels = 1 + len(OOD)
    n_series = len(TRAINED)
    points = C.id_vs_ood_points(summary, OOD)
    main = found["id_vs_ood"]["counts"]
    assert main["alpha_points_marks"] == points["drawn"].sum() == panels * (n_series * (len(ALPHAS) - 1) + 1)
    assert main["wise_paths_marks"] == panels * n_series
    assert main["selected_points_marks"] == panels * n_series
    assert main["ood_error_bars_marks"] == main["id_error_bars_marks"] == points["show_error"].sum()
    assert points["show_error"].sum() == points["drawn"].sum()  # several seeds: error bars at every point
    assert main["reference_label_marks"] == panels
    heat = found["accuracy_change"]["counts"]
    assert heat["heat_cells_marks"] == heat["heat_labels_marks"] == n_series * (panels + 1)
    cal = found["calibration"]["counts"]
    assert cal["calibration_curves_marks"] == len(SEEDS)
    assert cal["calibration_chosen_marks"] == len(SEEDS) * 3
    assert cal["calibration_gain_points_marks"] == 3 * 3 * (panels + 1)  # measures x calibrations x domains
    train = found["training_curves"]["counts"]
    measures = {"full_ft": 2, "l2sp": 3, "kd": 3}  # loss (total) + ce (+ penalty) per run ...
    expected_lines = sum((measures[m] + 1) * len(SEEDS) for m, _ in TRAINED)  # ... + ID val accuracy
    assert train["train_lines_marks"] == expected_lines
    assert train["val_points_marks"] == n_series * len(SEEDS) * 4

    # the screenshot shows a page, not a blank
    from PIL import Image

    image = Image.open(io.BytesIO(shot)).convert("RGB")
    assert image.width == PAGE_WIDTH and image.height >= 2000
    small = np.asarray(image.resize((image.width // 4, image.height // 4)))
    assert (small.min(axis=2) < 200).mean() > 0.02  # enough ink
    assert len(np.unique(small.reshape(-1, 3), axis=0)) > 50  # colours of several methods
    keep = os.environ.get("ROBUSTFT_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(tmp_path / "report.png", keep)


def test_single_seed_without_reference_run(report):
    """One seed and no ``zeroshot`` run: CI error bars, the reference point taken from alpha 0, no "±"."""
    summary = report["summary_frame"]
    summary = summary[(summary["seed"] == 0) & (summary["method"] != "zeroshot")].assign(n_seeds=1)
    points = C.id_vs_ood_points(summary, OOD)
    assert (points["error"] == "95% bootstrap CI").all() and (points["n_seeds"] == 1).all()
    reference = points[points["drawn"] & (points["kind"] == C.POINT_KINDS[0])]
    assert len(reference) == 1 + len(OOD) and (reference["alpha"] == 0).all()  # once per panel
    # a single run's CIs only at the reference, alpha = 1 and the chosen alpha
    shown = points[points["show_error"]]
    assert set(shown["alpha"]) == {0.0, 0.75, 1.0} and len(shown) == (1 + len(OOD)) * (1 + 2 * len(TRAINED))
    one = points[(points["method"] == "kd") & (points["alpha"] == 1) & (points["panel"] == "cartoon")].iloc[0]
    raw = summary[(summary["method"] == "kd") & (summary["alpha"] == 1) & (summary["eval_domain"] == "cartoon")
                  & (summary["calibration"] == "none")].iloc[0]
    assert (one["ood_lo"], one["ood_hi"]) == (raw["accuracy_ci_low"], raw["accuracy_ci_high"])
    change = C.accuracy_change(summary, OOD)
    assert change["reference"].notna().all()
    assert "±" not in C.leaderboard_text(C.leaderboard(summary, OOD))
    for chart in (C.id_vs_ood_chart(summary, OOD), C.accuracy_change_chart(summary, OOD),
                  C.calibration_chart(summary, pd.DataFrame(), OOD), C.training_curves_chart(pd.DataFrame())):
        assert chart.to_dict()  # validates against the Vega-Lite schema


# ------------------------------------------------------------------------------- several studies (issue #17)
SMALL, BIG = "efficientnet_lite0-imagenet-128px", "open_clip-ViT-B-32-openai-224px"
MATRIX_STUDIES = (
    {"study": f"pacs/{SMALL}", "dataset": "pacs", "backbone": SMALL, "id_domain": ID, "ood_domains": OOD},
    {"study": f"pacs/{BIG}", "dataset": "pacs", "backbone": BIG, "id_domain": ID, "ood_domains": OOD},
    {"study": f"domainnet/{SMALL}", "dataset": "domainnet", "backbone": SMALL, "id_domain": "real",
     "ood_domains": ["clipart", "sketch"]},
)
#: A grid for l2sp: ``strong`` loses on ID validation and wins on OOD test (the oracle's pick).
MATRIX_TRAINED = {**TRAINED, ("l2sp", "strong"): (0.10, 0.12, 0.02)}
MATRIX_REF = {**REF_ACC, "real": 0.70, "clipart": 0.45}
MATRIX_CONFIG = {"methods": {**CONFIG["methods"], "l2sp": {"default": {"encoder_strength": 0.1},
                                                           "strong": {"encoder_strength": 1.0}}},
                 "seeds": SEEDS, "sweep": {"alphas": ALPHAS}, "report": {"title": "robustft synthetic matrix"}}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    inputs = make_results(root, MATRIX_STUDIES, MATRIX_TRAINED, MATRIX_REF, offsets={f"pacs/{BIG}": 0.05})
    out = root / "results" / "report"
    written = write_report(inputs["summary"], inputs["curves"], inputs["logs"], MATRIX_CONFIG, out, png_scale=1.0,
                           run_studies=inputs["run_studies"], per_class_paths=inputs["per_class"])
    return {"root": root, "out": out, "written": written, **inputs,
            "summary_frame": pd.read_parquet(inputs["summary"])}


def test_variant_chosen_on_id_validation_beside_the_oracle(matrix):
    summary = matrix["summary_frame"]
    boards = C.leaderboards(summary)
    assert list(boards) == [s["study"] for s in MATRIX_STUDIES]
    table = boards[f"pacs/{SMALL}"]
    l2sp = table[table["method"] == "l2sp"].reset_index(drop=True)
    assert l2sp["point"].tolist()[:2] == [C.POINT_SELECTED_VARIANT, C.POINT_ORACLE_VARIANT]
    assert l2sp.loc[0, "variant"] == "default" and l2sp.loc[1, "variant"] == "strong"
    assert set(l2sp.loc[2:, "variant"]) == {"default", "strong"} and len(l2sp) == 6
    rows = summary[(summary["study"] == f"pacs/{SMALL}") & (summary["method"] == "l2sp") & summary["selected_alpha"]
                   & (summary["calibration"] == "none") & (summary["eval_domain"] == "ood_average")]
    # each seed at its own chosen variant and alpha, then the mean over seeds
    assert l2sp.loc[0, "ood_average"] == pytest.approx(rows.loc[rows["selected_variant"], "accuracy"].mean())
    assert l2sp.loc[1, "ood_average"] == pytest.approx(rows.loc[rows["oracle_variant"], "accuracy"].mean())
    assert l2sp.loc[1, "ood_average"] > l2sp.loc[0, "ood_average"]  # the selection gap
    shown = C.leaderboard_display(table)
    assert "not a valid selection" in " ".join(shown["weights"])
    # methods without a grid get no selection rows
    assert set(table.loc[table["method"] == "kd", "point"]) == {C.POINT_LAST, C.POINT_CHOSEN}


def test_leaderboard_across_backbones(matrix):
    summary = matrix["summary_frame"]
    cells = C.backbone_leaderboard(summary)
    across = C.backbone_leaderboard_display(cells)
    assert list(across) == ["pacs", "domainnet"]
    assert list(across["pacs"].columns) == ["method", f"{SMALL} ID", f"{SMALL} OOD avg", f"{BIG} ID", f"{BIG} OOD avg"]
    assert list(across["domainnet"].columns) == ["method", f"{SMALL} ID", f"{SMALL} OOD avg"]
    cell = cells[(cells["dataset"] == "pacs") & (cells["backbone"] == BIG) & (cells["method"] == "l2sp")
                 & (cells["measure"] == "OOD avg")].iloc[0]
    rows = summary[(summary["study"] == f"pacs/{BIG}") & (summary["method"] == "l2sp") & summary["selected_alpha"]
                   & summary["selected_variant"] & (summary["calibration"] == "none")
                   & (summary["eval_domain"] == "ood_average")]
    # each seed at the variant and alpha it chose on ID validation (here the seeds disagree on the variant)
    assert len(rows) == len(SEEDS) and cell["accuracy"] == pytest.approx(rows["accuracy"].mean())
    assert cell["variant"] == "/".join(sorted(set(rows["variant"]), key=lambda v: (v != "default", v)))
    big = cells[(cells["backbone"] == BIG) & (cells["dataset"] == "pacs")].set_index(["method", "measure"])
    small = cells[(cells["backbone"] == SMALL) & (cells["dataset"] == "pacs")].set_index(["method", "measure"])
    assert (big["accuracy"] > small["accuracy"]).all()  # the bigger backbone's offset, never mixed with the other


def test_files_of_several_studies(matrix, tmp_path):
    out = matrix["out"]
    text = (out / "leaderboard.txt").read_text()
    for study in MATRIX_STUDIES:
        assert f"== {study['study']}\n" in text
    assert "== pacs: across backbones" in text and "domainnet: across" not in text
    flat = pd.read_csv(out / "leaderboard.csv")
    assert list(flat["study"].unique()) == [s["study"] for s in MATRIX_STUDIES]
    page = (out / "index.html").read_text()
    assert page.count("<table class=\"leaderboard\">") == len(MATRIX_STUDIES) + 1
    assert "pacs: across backbones" in page and "3 studies" in page
    with pytest.raises(ValueError, match="pass run_studies"):
        write_report(matrix["summary"], matrix["curves"], matrix["logs"], MATRIX_CONFIG, tmp_path)
    from robustft.report.page import load_curves

    with pytest.raises(ValueError, match="one study per run"):
        load_curves(matrix["curves"], matrix["run_studies"][:-1])


@pytest.mark.browser
def test_page_of_several_studies_renders_in_chromium(matrix, tmp_path):
    rendered = render_in_chromium(matrix["out"] / "index.html", tmp_path / "profile")
    (tmp_path / "matrix.png").write_bytes(rendered["shot"])
    assert_fits_and_shows(rendered)
    found = rendered["found"]
    summary = matrix["summary_frame"]
    main = found["id_vs_ood"]["counts"]
    drawn = selected = oracle = 0
    for study in MATRIX_STUDIES:
        points = C.id_vs_ood_points(C.study_rows(summary, study["study"]), study["ood_domains"])
        drawn, selected, oracle = drawn + points["drawn"].sum(), selected + points["selected"].sum(), \
            oracle + points["oracle"].sum()
    panels = {"pacs": len(OOD) + 1, "domainnet": 3}
    assert main["alpha_points_marks"] == drawn
    # per study and panel: full_ft, full_ft (absent3), kd and l2sp's chosen variant get a ring; l2sp's oracle a cross
    assert selected == 4 * (2 * panels["pacs"] + panels["domainnet"]) == main["selected_points_marks"]
    assert oracle == 2 * panels["pacs"] + panels["domainnet"] == main["oracle_points_marks"]
    heat = found["accuracy_change"]["counts"]
    assert heat["heat_cells_marks"] == len(MATRIX_TRAINED) * (2 * (panels["pacs"] + 1) + panels["domainnet"] + 1)
    assert found["calibration"]["counts"]["calibration_curves_marks"] == len(MATRIX_STUDIES) * len(SEEDS)


def test_datasets_that_share_a_name_are_told_apart_by_their_id_domain(matrix):
    """Two studies of one dataset with different ID domains (PACS photo -> ..., PACS sketch -> ...) are two
    datasets of the report: never averaged together across backbones (they were, when grouped by name)."""
    summary = matrix["summary_frame"].copy()
    summary.loc[summary["dataset"] == "domainnet", "dataset"] = "pacs"  # a second PACS study, ID domain "real"
    labels = C.dataset_labels(summary)
    assert labels == {f"pacs/{SMALL}": f"pacs (ID {ID})", f"pacs/{BIG}": f"pacs (ID {ID})",
                      f"domainnet/{SMALL}": "pacs (ID real)"}
    assert list(C.datasets_of(summary)) == [f"pacs (ID {ID})", "pacs (ID real)"]
    cells = C.backbone_leaderboard(summary)
    for study, label in ((f"pacs/{SMALL}", f"pacs (ID {ID})"), (f"domainnet/{SMALL}", "pacs (ID real)")):
        cell = cells[(cells["dataset"] == label) & (cells["backbone"] == SMALL) & (cells["method"] == "kd")
                     & (cells["measure"] == "ID")].iloc[0]
        rows = summary[(summary["study"] == study) & (summary["method"] == "kd") & summary["selected_alpha"]
                       & (summary["calibration"] == "none") & (summary["eval_domain"] == summary["train_domain"])
                       & (summary["split"] == "test")]
        assert cell["accuracy"] == pytest.approx(rows["accuracy"].mean()), study


def test_per_class_section_names_the_most_damaged_classes(report):
    page = (report["out"] / "index.html").read_text()
    section = page[page.index('<section id="per_class_damage">'):]
    section = section[: section.index("</section>")]
    assert 'data-chart="per_class_damage"' in section and "The class each method damaged most" in section
    # seed 0 and 1 deltas average to the lowest for one class per (method, domain): each row names a class and a loss
    assert section.count("<tr class=") == len(TRAINED) * (1 + len(OOD))
    assert "-7.5" in section  # (-0.10 + -0.05) / 2 in points
