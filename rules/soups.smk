# Model soups (robustft.soups, Wortsman et al. 2022): each soup of a study's runs is a run of its own,
# runs/<kind>_soup/<source>/seed0/, with the WiSE-FT sweep and calibration of any run (rules sweep and calibrate,
# reused) and rows in the study's summary; and the per-class damage table of each study (robustft.per_class).

SOUP_RUN = "results/{dataset}/{backbone}/runs/{kind}_soup/{source}/seed0"


wildcard_constraints:
    kind="uniform|greedy",
    source=r"[A-Za-z0-9][A-Za-z0-9_-]*",


def soup_of(wildcards):
    """The row of SOUPS (robustft.soups.soup_table) of a soup job."""
    key = (f"{wildcards.dataset}/{wildcards.backbone}", wildcards.kind, wildcards.source)
    for soup in SOUPS:
        if (soup["study"], soup["kind"], soup["source"]) == key:
            return soup
    raise WorkflowError(f"no {wildcards.kind} soup of {wildcards.source} in study {key[0]} (see soups: in the config)")


def soup_inputs(wildcards):
    """The soup's ingredients (their run.json) and the ID validation caches greedy selection is scored on."""
    runs = [run_path(rules.finetune.output.run, {**soup_of(wildcards), **r}) for r in soup_of(wildcards)["ingredients"]]
    return {**study_inputs(wildcards, "pcv_logits"), "runs": runs}


def soup_sweep_inputs(wildcards):
    """As rule sweep's (sweep_inputs), the soup's protocol deciding whether gamma's training sample is read."""
    inputs = dict(study_inputs(wildcards, "sweep"))
    if config["calibration"]["gamma_source"] == "train" and soup_of(wildcards)["protocol"]["kind"] == "class_subset":
        inputs.update(study_inputs(wildcards, "gamma_source"))
    return inputs


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


def per_class_inputs(wildcards):
    """The study's summary (each run's chosen alpha), and every run's and soup's sweep logits with its run.json."""
    s = study(wildcards)
    runs = [r for r in study_runs(s) if r["method"] != "zeroshot"]  # zeroshot is the reference: no change
    soups = [soup for soup in SOUPS if soup["study"] == s["study"]]
    return {
        "manifest": study_manifest(wildcards),
        "summary": rules.study_summary.output.summary.format(dataset=s["dataset"], backbone=s["backbone"]),
        "logits": [run_path(rules.sweep.output.logits, r) for r in runs]
        + [soup_path(rules.soup_sweep.output.logits, soup) for soup in soups],
        "runs": [run_path(rules.finetune.output.run, r) for r in runs]
        + [soup_path(rules.soup.output.run, soup) for soup in soups],
    }


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
