# Decoded pixel caches (uint8 HDF5, one per manifest, preprocessing, domain, split and cap) and pre-trained feature
# caches (HDF5, one per backbone and pixel cache).


rule pixel_cache:
    input:
        manifest=rules.manifest.output.manifest,
    output:
        pixels="results/pixels/{data}/{preprocess}/{domain}_{split}-{cap}.h5",
    params:
        max_per_class=lambda wc: cap_value(wc.cap),
        backbone=lambda wc: PREPROCESS[wc.preprocess],
        code=code_version("pixel_cache.py"),
    threads: 8
    log:
        "results/logs/pixel_cache/{data}/{preprocess}/{domain}_{split}-{cap}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/pixel_cache.py"


rule features:
    input:
        pixels=features_pixels,
        weights=rules.weights.output.record,
    output:
        features="results/features/{backbone}/{data}/{domain}_{split}-{cap}.h5",
    params:
        backbone=per_backbone(job_backbone),
        batch_size=config["eval"]["batch_size"],
        device=config["training"]["device"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("features.py"),
    resources:
        gpu=1,
    log:
        "results/logs/features/{backbone}/{data}/{domain}_{split}-{cap}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/features.py"
