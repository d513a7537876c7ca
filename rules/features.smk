# Decoded pixel caches (uint8 HDF5, once per preprocessing) and pre-trained feature caches (HDF5).


rule pixel_cache:
    input:
        manifest=MANIFEST,
    output:
        pixels="results/pixels/{dataset}/{preprocess}/{domain}_{split}.h5",
    params:
        max_per_class=lambda wc: split_cap(wc.split),
        backbone=BACKBONE_SPEC,
        code=code_version("robustft/data", "robustft/io"),
    threads: config["dataset"]["workers"]
    log:
        "results/logs/pixel_cache/{dataset}/{preprocess}/{domain}_{split}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/pixel_cache.py"


rule features:
    input:
        pixels=lambda wc: pixel_path(wc.domain, wc.split),
    output:
        features="results/features/{backbone}/{dataset}/{domain}_{split}.h5",
    params:
        backbone=BACKBONE_SPEC,
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("robustft/backbones", "robustft/features.py"),
    resources:
        gpu=1,
    log:
        "results/logs/features/{backbone}/{dataset}/{domain}_{split}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/features.py"
