# Per-run WiSE-FT sweep: every alpha, every eval split, one job and one logits file per run.


rule sweep:
    input:
        unpack(sweep_inputs),
        run=rules.finetune.output.run,
        reference_head=rules.reference.output.head,
        weights=rules.weights.output.record,
    output:
        logits="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/sweep_logits.h5",
    params:
        backbone=per_backbone(job_backbone),
        splits=per_study(lambda s: [f"{d}_{p}" for d, p in eval_splits(s)]),
        alphas=config["sweep"]["alphas"],
        fisher_examples=config["sweep"]["fisher_examples"] if config["sweep"]["fisher"] else 0,
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("sweep.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        "results/logs/sweep/{dataset}/{backbone}/{method}/{variant}/seed{seed}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/sweep.py"
