# Per-run logit-scale calibration (ALG, PCV) and metrics with bootstrap confidence intervals.


rule calibrate:
    input:
        manifest=MANIFEST,
        run=f"{RUN_DIR}/run.json",
        logits=f"{RUN_DIR}/sweep_logits.h5",
    output:
        metrics=f"{RUN_DIR}/metrics.parquet",
        curve=f"{RUN_DIR}/calibration_curve.parquet",
    params:
        id_domain=ID_DOMAIN,
        gamma_source=config["calibration"]["gamma_source"],
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        code=code_version("robustft/calibration.py", "robustft/metrics.py", "robustft/pipeline/analysis.py"),
    log:
        f"results/logs/calibrate/{{method}}/{{variant}}/seed{{seed}}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/calibrate.py"
