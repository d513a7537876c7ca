# Analyses over the config's summary (results/analysis/, every table documented in the README): effective robustness
# per point against a baseline line per OOD domain, paired comparisons of each method's selected point with the
# reference and full fine-tuning, and the recommendation under the configured ID floor. Inputs are plain paths (see
# rules/report.smk); the per-image correctness comes from each run's metrics.parquet.

ANALYSIS_DIR = "results/analysis"


rule effective_robustness:
    input:
        summary=str(rules.summary.output.summary),
    output:
        table=f"{ANALYSIS_DIR}/effective_robustness.parquet",
    params:
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        code=code_version("effective_robustness.py"),
    log:
        "results/logs/analysis/effective_robustness.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/effective_robustness.py"


rule paired_tests:
    input:
        summary=str(rules.summary.output.summary),
        metrics=every_metrics_file(),
    output:
        table=f"{ANALYSIS_DIR}/paired_tests.parquet",
    params:
        run_studies=every_metrics_study(),  # the study of each metrics file, in their order
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        code=code_version("paired_tests.py"),
    log:
        "results/logs/analysis/paired_tests.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/paired_tests.py"


rule recommendation:
    input:
        summary=str(rules.summary.output.summary),
        metrics=every_metrics_file(),
    output:
        table=f"{ANALYSIS_DIR}/recommendation.parquet",
    params:
        run_studies=every_metrics_study(),
        id_floor=str(config["analyses"]["id_floor"]),
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        code=code_version("recommendation.py"),
    log:
        "results/logs/analysis/recommendation.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/recommendation.py"
