# Per-run logit-scale calibration (ALG, PCV) and metrics with bootstrap confidence intervals.


rule calibrate:
    input:
        unpack(pcv_inputs),
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
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("robustft/calibration.py", "robustft/metrics.py", "robustft/pipeline/analysis.py"),
    log:
        f"results/logs/calibrate/{{method}}/{{variant}}/seed{{seed}}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/calibrate.py"


rule finetune_pcv:
    input:
        manifest=MANIFEST,
        train_pixels=pixel_path(ID_DOMAIN, "train"),
        val_pixels=pixel_path(ID_DOMAIN, "val"),
        train_features=feature_path(ID_DOMAIN, "train"),
        val_features=feature_path(ID_DOMAIN, "val"),
        reference_head=REFERENCE_HEAD,
    output:
        run=f"{RUN_DIR}/pcv/fold{{fold}}/run.json",
    params:
        backbone=BACKBONE_SPEC,
        templates=config["backbone"]["templates"],
        settings=variant_params,
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        folds=config["calibration"]["pcv_folds"],
        fraction=config["calibration"]["pcv_fraction"],
        code=code_version("robustft/training", "robustft/methods", "robustft/models.py", "robustft/fisher.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        f"results/logs/finetune_pcv/{{method}}/{{variant}}/seed{{seed}}/fold{{fold}}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/finetune_pcv.py"


rule pcv_logits:
    input:
        manifest=MANIFEST,
        run=f"{RUN_DIR}/pcv/fold{{fold}}/run.json",
        parent=f"{RUN_DIR}/run.json",
        reference_head=REFERENCE_HEAD,
        val_pixels=pixel_path(ID_DOMAIN, "val"),
        val_features=feature_path(ID_DOMAIN, "val"),
    output:
        logits=f"{RUN_DIR}/pcv/fold{{fold}}/val_logits.h5",
    params:
        backbone=BACKBONE_SPEC,
        alphas=config["sweep"]["alphas"],
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("robustft/evaluation.py", "robustft/interpolation.py", "robustft/pipeline/analysis.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        f"results/logs/pcv_logits/{{method}}/{{variant}}/seed{{seed}}/fold{{fold}}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/pcv_logits.py"
