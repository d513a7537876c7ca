"""Rule manifest: scan, verify, split and label the dataset into a Parquet manifest."""

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.stages import manifest_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    p = snakemake.params  # noqa: F821
    manifest_stage(dataset=p.dataset, root=p.root, domains=list(p.domains), split=dict(p.split),
                   on_bad_image=p.on_bad_image, expected_counts=p.expected_counts,
                   threads=snakemake.threads,  # noqa: F821
                   out=snakemake.output.manifest)  # noqa: F821
