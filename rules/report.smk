# The report over every study of the config: results/report/index.html (self-contained), each chart as PNG and
# Vega-Lite JSON, the leaderboard. The PNGs and the page are registered for `snakemake --report report.html`; the
# rule prints the leaderboard.

from robustft.report import CHART_NAMES  # cheap: no plotting library at parse time

REPORT_DIR = "results/report"


rule report:
    input:
        # a plain path, not the rule's output object: with one, Snakemake hashes this rule's whole input lists once
        # per input file (quadratic in runs; bench/README.md)
        summary=str(rules.summary.output.summary),
        manifests=sorted({rules.manifest.output.manifest.format(data=s["data"]) for s in STUDIES}),
        curves=[run_path(rules.calibrate.output.curve, r) for r in RUNS],
        train_logs=[run_path(rules.finetune.output.train_log, r) for r in RUNS],
        per_class=[rules.per_class.output.table.format(dataset=s["dataset"], backbone=s["backbone"]) for s in STUDIES],
        # results/analysis/ (rules/analyses.smk), each shown in its own section
        effective_robustness=str(rules.effective_robustness.output.table),
        paired_tests=str(rules.paired_tests.output.table),
        recommendation=str(rules.recommendation.output.table),
    output:
        index=report(f"{REPORT_DIR}/index.html", category="1. Report page", caption="../report/index.rst"),
        id_vs_ood=report(f"{REPORT_DIR}/id_vs_ood.png", category="2. Figures", caption="../report/id_vs_ood.rst",
                         labels={"figure": "1. ID vs OOD accuracy"}),
        accuracy_change=report(f"{REPORT_DIR}/accuracy_change.png", category="2. Figures",
                               caption="../report/accuracy_change.rst",
                               labels={"figure": "2. Change from the reference"}),
        calibration=report(f"{REPORT_DIR}/calibration.png", category="2. Figures",
                           caption="../report/calibration.rst", labels={"figure": "3. Calibration"}),
        training_curves=report(f"{REPORT_DIR}/training_curves.png", category="2. Figures",
                               caption="../report/training_curves.rst", labels={"figure": "4. Training curves"}),
        per_class_damage=report(f"{REPORT_DIR}/per_class_damage.png", category="2. Figures",
                                caption="../report/per_class_damage.rst", labels={"figure": "5. Per-class damage"}),
        effective_robustness=report(f"{REPORT_DIR}/effective_robustness.png", category="2. Figures",
                                    caption="../report/effective_robustness.rst",
                                    labels={"figure": "6. Effective robustness"}),
        specs=[f"{REPORT_DIR}/{name}.vl.json" for name in CHART_NAMES],
        leaderboard=f"{REPORT_DIR}/leaderboard.txt",
        leaderboard_csv=report(f"{REPORT_DIR}/leaderboard.csv", category="3. Tables",
                               caption="../report/leaderboard.rst"),
    params:
        description=report_description(),
        run_studies=[r["study"] for r in RUNS],  # the study of each curve and train log, in their order
        code=code_version("report.py"),
    log:
        "results/logs/report.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/report.py"
