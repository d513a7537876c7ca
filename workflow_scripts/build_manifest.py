"""Rule manifest: scan, verify, split and label the dataset into a Parquet manifest."""

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.stages import manifest_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    p = snakemake.params  # noqa: F821
    manifest_stage(p.dataset, p.root, list(p.domains), dict(p.split), p.on_bad_image, snakemake.threads,  # noqa: F821
                   snakemake.output.manifest)  # noqa: F821
