# The reference model's head: CLIP zero-shot head, or a linear probe for classifier backbones.


rule reference:
    input:
        manifest=MANIFEST,
        train=feature_path(ID_DOMAIN, "train"),
        val=feature_path(ID_DOMAIN, "val"),
    output:
        head=REFERENCE_HEAD,
        info=f"results/reference/{BACKBONE}/{DATASET}/reference.json",
    params:
        backbone=BACKBONE_SPEC,
        reference=config["reference"],
        templates=config["backbone"]["templates"],
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("robustft/heads.py", "robustft/backbones"),
    log:
        f"results/logs/reference/{BACKBONE}/{DATASET}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/reference.py"
