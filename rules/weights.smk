# Each backbone's checkpoint, resolved once on the submit node (an open_clip tag downloaded into weights_dir, a
# local file used in place) and recorded with its size and SHA-256: every rule that builds the model reads the file
# named in the record and never touches the network. `snakemake --until weights` pre-fetches them.


rule weights:
    input:
        unpack(weights_inputs),
    output:
        record="results/weights/{backbone}.json",
    params:
        backbone=lambda wc: backbone_spec(wc.backbone),
        weights_dir=config["weights_dir"],
        code=code_version("fetch_weights.py"),
    retries: 0
    log:
        "results/logs/weights/{backbone}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/fetch_weights.py"


# Every checkpoint of the config is resolved before the first manifest or pixel cache job starts: offline, the run
# stops on the weights job within seconds instead of after hours of caching. The data rules take this file as an
# ancient() input, so that a backbone added to or removed from the config (which rewrites the file) reruns nothing.
rule weights_checked:
    input:
        records=[rules.weights.output.record.format(backbone=key) for key in BACKBONES],
    output:
        checked="results/weights/checked.json",
    params:
        code=code_version("check_weights.py"),
    log:
        "results/logs/weights_checked.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/check_weights.py"
