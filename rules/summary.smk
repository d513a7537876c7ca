# All runs, domains, alphas and calibrations in one table: results/summary.parquet.


rule summary:
    input:
        metrics=[f"{d}/metrics.parquet" for d in run_dirs()],
        runs=[f"{d}/run.json" for d in run_dirs()],
    output:
        summary="results/summary.parquet",
    params:
        # one study per metrics file: {study, dataset, backbone, id_domain, ood_domains} (summary_stage's studies)
        studies=[{"study": f"{DATASET}/{BACKBONE}", "dataset": DATASET, "backbone": BACKBONE, "id_domain": ID_DOMAIN,
                  "ood_domains": OOD_DOMAINS}] * len(run_dirs()),
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        code=code_version("robustft/pipeline/analysis.py"),
    log:
        "results/logs/summary.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/summary.py"
