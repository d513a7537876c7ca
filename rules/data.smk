# Dataset manifest (Parquet) and, where the configured PACS root is absent, fetching PACS.


rule fetch_pacs:
    output:
        marker="results/data/PACS/.complete",
    params:
        dest=lambda wildcards, output: os.path.dirname(output.marker),
    log:
        "results/logs/fetch_pacs.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/fetch_pacs.py"


rule manifest:
    input:
        unpack(manifest_inputs),
    output:
        manifest=MANIFEST,
    params:
        dataset=DATASET,
        root=dataset_root(),
        domains=DOMAINS,
        split=config["dataset"]["split"],
        on_bad_image=config["dataset"]["on_bad_image"],
        code=code_version("robustft/data"),
    threads: config["dataset"]["workers"]
    log:
        f"results/logs/manifest/{DATASET}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/build_manifest.py"
