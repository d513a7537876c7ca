# One fine-tuning job per (method, variant, seed); resumes from its last checkpoint when requeued.


rule finetune:
    input:
        manifest=MANIFEST,
        train_pixels=pixel_path(ID_DOMAIN, "train"),
        val_pixels=pixel_path(ID_DOMAIN, "val"),
        train_features=feature_path(ID_DOMAIN, "train"),
        val_features=feature_path(ID_DOMAIN, "val"),
        reference_head=REFERENCE_HEAD,
    output:
        run=f"{RUN_DIR}/run.json",
        train_log=f"{RUN_DIR}/train_log.parquet",
    params:
        backbone=BACKBONE_SPEC,
        templates=config["backbone"]["templates"],
        settings=variant_params,
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("robustft/training", "robustft/methods", "robustft/models.py", "robustft/fisher.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        f"results/logs/finetune/{{method}}/{{variant}}/seed{{seed}}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/finetune.py"
