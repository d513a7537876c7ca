# Per-run WiSE-FT sweep: every alpha, every eval split, one job and one logits file per run.


rule sweep:
    input:
        unpack(lambda wc: {f"pixels_{k}": v for k, v in eval_pixel_paths().items()}),
        unpack(lambda wc: {f"features_{k}": v for k, v in eval_feature_paths().items()}),
        unpack(sweep_fisher_inputs),
        manifest=MANIFEST,
        run=f"{RUN_DIR}/run.json",
        reference_head=REFERENCE_HEAD,
    output:
        logits=f"{RUN_DIR}/sweep_logits.h5",
    params:
        backbone=BACKBONE_SPEC,
        splits=eval_split_names(),
        alphas=config["sweep"]["alphas"],
        fisher_examples=config["sweep"]["fisher_examples"] if config["sweep"]["fisher"] else 0,
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("robustft/evaluation.py", "robustft/interpolation.py", "robustft/pipeline/analysis.py"),
    threads: 2
    resources:
        gpu=1,
    log:
        f"results/logs/sweep/{{method}}/{{variant}}/seed{{seed}}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/sweep.py"
