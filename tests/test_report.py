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
from robustft.pipeline.analysis import SUMMARY_COLUMNS
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
    "backbone": {"name": "efficientnet_lite0", "image_size": 128},
    "methods": {"zeroshot": {"default": {}}, "full_ft": {"default": {}, "absent3": {
        "protocol": {"kind": "class_subset", "absent_classes": ["giraffe", "guitar", "house"]}}},
                "l2sp": {"default": {"encoder_strength": 0.1}}, "kd": {"default": {"kd_weight": 0.5}}},
    "seeds": SEEDS, "sweep": {"alphas": ALPHAS}, "report": {"title": "robustft synthetic report"},
}


# ------------------------------------------------------------------------------------------------ synthetic data
def _accuracy(method, variant, seed, domain, alpha, calibration, rng):
    ref = REF_ACC[domain]
    if method == "zeroshot":
        return ref
    id_gain, ood_gain, bump = TRAINED[(method, variant)]
    end = ref + (id_gain if domain == ID else ood_gain)
    acc = (1 - alpha) * ref + alpha * end + (0 if domain == ID else bump * 4 * alpha * (1 - alpha))
    acc += 0.01 * alpha * rng.standard_normal() + 0.004 * seed
    if calibration == "alg":
        acc += 0.02 * alpha
    if calibration == "pcv":
        acc += 0.03 * alpha
    return float(np.clip(acc, 0, 1))


def make_results(root: Path) -> dict:
    """A summary, per-run calibration curves and train logs shaped like the pipeline's, under ``root/results``."""
    rng = np.random.default_rng(0)
    runs = [("zeroshot", "default")] + list(TRAINED)
    rows, curve_paths, log_paths = [], [], []
    for method, variant in runs:
        for seed in SEEDS:
            absent = (method, variant) == ABSENT_RUN
            cals = ["none", "alg", "pcv"] if absent else ["none"]
            run_dir = root / "results" / "runs" / method / variant / f"seed{seed}"
            run_dir.mkdir(parents=True)
            trainable = 0 if method == "zeroshot" else 3_400_000
            for alpha in ALPHAS:
                for cal in cals:
                    gamma = {"none": 0.0, "alg": 1.3, "pcv": 1.8}[cal]
                    per_domain = []
                    for domain, split in [(ID, "val"), (ID, "test")] + [(d, "test") for d in OOD]:
                        acc = _accuracy(method, variant, seed, domain, alpha, cal, rng)
                        if split == "val":
                            acc = acc - 2.0 * (alpha - 0.75) ** 2  # ID val prefers alpha 0.75
                        absent_acc = 1 / (1 + np.exp(-(gamma - 1.5 + 0.1 * seed))) if absent else np.nan
                        seen = 0.95 - 0.9 * absent_acc ** 3 if absent else acc
                        row = {"method": method, "variant": variant, "seed": seed, "eval_domain": domain,
                               "split": split, "alpha": alpha, "interpolation": "linear", "calibration": cal,
                               "gamma": gamma, "n": 175, "accuracy": acc, "accuracy_ci_low": acc - 0.03,
                               "accuracy_ci_high": acc + 0.03, "seen_accuracy": seen, "absent_accuracy": absent_acc,
                               "n_seen": 100 if absent else 175, "n_absent": 75 if absent else 0,
                               "ausuc": 0.4 if absent else np.nan}
                        rows.append(row)
                        if split == "test" and domain != ID:
                            per_domain.append(row)
                    avg = dict(per_domain[0], eval_domain="ood_average",
                               accuracy=float(np.mean([r["accuracy"] for r in per_domain])))
                    avg.update(accuracy_ci_low=avg["accuracy"] - 0.02, accuracy_ci_high=avg["accuracy"] + 0.02)
                    rows.append(avg)
            curve = pd.DataFrame(columns=["gamma", "seen_accuracy", "absent_accuracy", "accuracy", "eval_domain",
                                          "split", "alpha", "interpolation", "ausuc", "method", "variant", "seed"])
            if absent:
                gammas = np.linspace(-1, 5, 40)
                parts = []
                for domain in [ID, *OOD]:
                    for split in (["val", "test"] if domain == ID else ["test"]):
                        for alpha in ALPHAS:
                            absent_acc = 1 / (1 + np.exp(-(gammas - 1.5 + 0.1 * seed)))
                            seen_acc = 0.95 - 0.9 * absent_acc ** 3
                            parts.append(pd.DataFrame({
                                "gamma": gammas, "seen_accuracy": seen_acc, "absent_accuracy": absent_acc,
                                "accuracy": (seen_acc * 100 + absent_acc * 75) / 175, "eval_domain": domain,
                                "split": split, "alpha": alpha, "interpolation": "linear", "ausuc": 0.4,
                                "method": method, "variant": variant, "seed": seed}))
                curve = pd.concat(parts, ignore_index=True)
            write_table(run_dir / "calibration_curve.parquet", curve)
            curve_paths.append(run_dir / "calibration_curve.parquet")
            log_paths.append(run_dir / "train_log.parquet")
            write_table(log_paths[-1], _train_log(method, seed, rng))
    summary = pd.DataFrame(rows)
    return {"summary": _finish_summary(summary, root), "curves": curve_paths, "logs": log_paths}


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


def _finish_summary(summary: pd.DataFrame, root: Path) -> Path:
    summary = summary.assign(backbone="efficientnet_lite0-imagenet-128px", dataset="pacs", protocol="full",
                             train_domain=ID, total_params=3_400_000)
    summary["protocol"] = np.where(summary["variant"] == "absent3", "class_subset", "full")
    summary["is_ood"] = summary["eval_domain"] != ID
    trained = summary["method"] != "zeroshot"
    summary["trainable_params"] = np.where(trained, 3_400_000, 0)
    summary["checkpoint_bytes"] = np.where(trained, 13_600_000, 0)
    summary["train_seconds"] = np.where(trained, 95.0, 0.0)
    keys = ["method", "variant", "seed", "interpolation", "calibration"]
    val = summary[(summary["eval_domain"] == ID) & (summary["split"] == "val")]
    best = (val.sort_values("alpha").sort_values("accuracy", ascending=False, kind="stable")
            .drop_duplicates(keys)[[*keys, "alpha"]].assign(selected_alpha=True))
    summary = summary.merge(best, on=[*keys, "alpha"], how="left")
    summary["selected_alpha"] = summary["selected_alpha"].astype("boolean").fillna(False).astype(bool)
    group = summary.groupby(["method", "variant", "eval_domain", "split", "alpha", "interpolation",
                             "calibration"])["accuracy"]
    summary["accuracy_seed_mean"] = group.transform("mean")
    summary["accuracy_seed_std"] = group.transform("std").fillna(0.0)
    summary["n_seeds"] = group.transform("size")
    summary["study"] = "pacs/efficientnet_lite0-imagenet-128px"
    summary["selected_variant"] = summary["oracle_variant"] = True
    chosen = summary[summary["selected_alpha"]].groupby(["method", "variant", "eval_domain", "split", "interpolation",
                                                          "calibration"])["accuracy"]
    summary["selected_seed_mean"] = chosen.transform("mean")
    summary["selected_seed_std"] = chosen.transform("std")
    path = root / "results" / "summary.parquet"
    write_table(path, summary[list(SUMMARY_COLUMNS)])
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_results(root)
    out = root / "results" / "report"
    written = write_report(inputs["summary"], inputs["curves"], inputs["logs"], CONFIG, out, png_scale=1.0)
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


def test_calibration_note_without_absent_classes(report, tmp_path):
    summary = report["summary_frame"]
    summary = summary[summary["variant"] != "absent3"].assign(n_absent=0)
    chart = C.calibration_chart(summary, pd.DataFrame())
    assert chart.to_dict()["mark"]["type"] == "text"


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


@pytest.mark.browser
def test_page_renders_in_chromium(report, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)")
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open((report["out"] / "index.html").resolve().as_uri())
        browser.wait_for("document.body && document.body.dataset.charts === 'done'")
        found = browser.evaluate(_COUNT_MARKS)
        shot = browser.screenshot()
        problems = browser.problems()
    finally:
        browser.close()
    (tmp_path / "report.png").write_bytes(shot)
    assert found.pop("__scripts_with_src") == []
    assert not problems, problems
    assert set(found) == set(CHART_NAMES)
    for name, chart in found.items():
        assert chart["status"] == "rendered" and chart["svgs"] == 1, (name, chart)
        assert chart["counts"] and all(n > 0 for n in chart["counts"].values()), (name, chart)

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
    assert image.width >= 1000 and image.height >= 2000
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
