# Each backbone's checkpoint, resolved once on the submit node (an open_clip tag downloaded into weights_dir, a
# local file used in place) and recorded with its size and SHA-256: every rule that builds the model reads the file
# named in the record and never touches the network. `snakemake --until weights` pre-fetches them.
#
# The data rules do not wait for it: a manifest or pixel cache may be shared by several backbones, and a dependency
# on their checkpoints would rerun it whenever a backbone is added or removed. (An ancient() dependency would not,
# but Snakemake 9.27 then skips its own rerun checks for everything downstream of a rerun job, so a changed param
# would go unnoticed in that run.) The priority makes it the first job instead.


rule weights:
    input:
        unpack(weights_inputs),
    output:
        record="results/weights/{backbone}.json",
    params:
        backbone=lambda wc: backbone_spec(wc.backbone),
        weights_dir=config["weights_dir"],
        code=code_version("fetch_weights.py"),
    # the first job of a fresh run (offline, it fails within seconds, before any pixel is cached), never retried
    priority: 100
    retries: 0
    log:
        "results/logs/weights/{backbone}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/fetch_weights.py"

