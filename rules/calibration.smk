# Per-run logit-scale calibration (ALG, PCV) and metrics with bootstrap confidence intervals.


rule calibrate:
    input:
        unpack(calibrate_inputs),
        run=rules.finetune.output.run,
        logits=rules.sweep.output.logits,
    output:
        metrics="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/metrics.parquet",
        curve="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/calibration_curve.parquet",
    params:
        id_domain=per_study(lambda s: s["id_domain"]),
        gamma_source=config["calibration"]["gamma_source"],
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("calibrate.py"),
    log:
        "results/logs/calibrate/{dataset}/{backbone}/{method}/{variant}/seed{seed}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/calibrate.py"


rule finetune_pcv:
    input:
        unpack(training_inputs),
        reference_head=rules.reference.output.head,
        weights=rules.weights.output.record,
    output:
        run="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/pcv/fold{fold}/run.json",
    params:
        backbone=per_backbone(job_backbone),
        templates=per_backbone(lambda key: BACKBONES[key]["templates"]),
        settings=variant_params,
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        folds=config["calibration"]["pcv_folds"],
        fraction=config["calibration"]["pcv_fraction"],
        code=code_version("finetune_pcv.py"),
    threads: 2
    resources:
        gpu=job_devices,
    log:
        "results/logs/finetune_pcv/{dataset}/{backbone}/{method}/{variant}/seed{seed}/fold{fold}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/finetune_pcv.py"


rule pcv_logits:
    input:
        unpack(pcv_logits_inputs),
        run=rules.finetune_pcv.output.run,
        parent=rules.finetune.output.run,
        reference_head=rules.reference.output.head,
        weights=rules.weights.output.record,
    output:
        logits="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/pcv/fold{fold}/val_logits.h5",
    params:
        backbone=per_backbone(job_backbone),
        alphas=config["sweep"]["alphas"],
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("pcv_logits.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        "results/logs/pcv_logits/{dataset}/{backbone}/{method}/{variant}/seed{seed}/fold{fold}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/pcv_logits.py"
