# One fine-tuning job per (study, method, variant, seed); resumes from its last checkpoint when requeued.


rule finetune:
    input:
        unpack(training_inputs),
        reference_head=rules.reference.output.head,
        weights=rules.weights.output.record,
    output:
        run="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/run.json",
        train_log="results/{dataset}/{backbone}/runs/{method}/{variant}/seed{seed}/train_log.parquet",
    params:
        backbone=per_backbone(job_backbone),
        templates=per_backbone(lambda key: BACKBONES[key]["templates"]),
        settings=variant_params,
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("finetune.py"),
    threads: 2
    resources:
        gpu=job_devices,  # training.devices: ranks of torch.distributed, one GPU each, one node
    log:
        "results/logs/finetune/{dataset}/{backbone}/{method}/{variant}/seed{seed}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/finetune.py"
