# Dataset manifests (Parquet, one per dataset root, domain set and split) and, where the configured PACS root is
# absent, fetching PACS.


rule fetch_pacs:
    output:
        marker=f"{LOCAL_PACS}/.complete",
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
        manifest="results/data/{data}/manifest.parquet",
    params:
        dataset=lambda wc: manifest_params(wc)["dataset"],
        root=lambda wc: manifest_params(wc)["root"],
        domains=lambda wc: manifest_params(wc)["domains"],
        split=lambda wc: manifest_params(wc)["split"],
        on_bad_image=lambda wc: manifest_params(wc)["on_bad_image"],
        expected_counts=lambda wc: manifest_params(wc)["expected_counts"],
        code=code_version("build_manifest.py"),
    threads: 8
    log:
        "results/logs/manifest/{data}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/build_manifest.py"
