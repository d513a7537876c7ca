# The reference model's head, one per study: CLIP zero-shot head, or a linear probe for classifier backbones.


rule reference:
    input:
        unpack(reference_inputs),
        weights=rules.weights.output.record,
    output:
        head="results/{dataset}/{backbone}/reference/head.safetensors",
        info="results/{dataset}/{backbone}/reference/reference.json",
    params:
        backbone=per_backbone(job_backbone),
        reference=config["reference"],
        templates=per_backbone(lambda key: BACKBONES[key]["templates"]),
        cpu_threads=config["compute"]["cpu_threads"],
        code=code_version("reference.py"),
    log:
        "results/logs/reference/{dataset}/{backbone}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/reference.py"
