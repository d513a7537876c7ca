# Model soups (robustft.soups, Wortsman et al. 2022): each soup of a study's runs is a run of its own,
# runs/<kind>_soup/<source>/seed0/, with the WiSE-FT sweep and calibration of any run (rules sweep and calibrate,
# reused) and rows in the study's summary; and the per-class damage table of each study (robustft.per_class).

SOUP_RUN = "results/{dataset}/{backbone}/runs/{kind}_soup/{source}/seed0"


wildcard_constraints:
    kind="uniform|greedy",
    source=r"[A-Za-z0-9][A-Za-z0-9_-]*",


rule soup:
    input:
        unpack(soup_inputs),
        reference_head=rules.reference.output.head,
        weights=rules.weights.output.record,
    output:
        run=f"{SOUP_RUN}/run.json",
    params:
        backbone=per_backbone(job_backbone),
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("soup.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        "results/logs/soup/{dataset}/{backbone}/{kind}_soup/{source}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/soup.py"


use rule sweep as soup_sweep with:
    input:
        unpack(soup_sweep_inputs),
        run=rules.soup.output.run,
        reference_head=rules.reference.output.head,
        weights=rules.weights.output.record,
    output:
        logits=f"{SOUP_RUN}/sweep_logits.h5",
    log:
        "results/logs/sweep/{dataset}/{backbone}/{kind}_soup/{source}/seed0.log",


# A soup has no PCV fold models: it is calibrated with ALG only.
use rule calibrate as soup_calibrate with:
    input:
        manifest=study_manifest,
        run=rules.soup.output.run,
        logits=rules.soup_sweep.output.logits,
    output:
        metrics=f"{SOUP_RUN}/metrics.parquet",
        curve=f"{SOUP_RUN}/calibration_curve.parquet",
    log:
        "results/logs/calibrate/{dataset}/{backbone}/{kind}_soup/{source}/seed0.log",


rule per_class:
    input:
        unpack(per_class_inputs),
    output:
        table="results/{dataset}/{backbone}/per_class.parquet",
    params:
        code=code_version("per_class.py"),
    log:
        "results/logs/per_class/{dataset}/{backbone}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/per_class.py"
