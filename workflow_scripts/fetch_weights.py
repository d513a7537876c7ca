"""Rule weights: resolve one backbone's checkpoint (download a tag, or a local file in place) and record it."""

from robustft.network import restore_user_hub_env

restore_user_hub_env()  # the workflow switched the hub offline for every job; this rule is the one that may download

from robustft.pipeline.script_log import rule_log  # noqa: E402
from robustft.pipeline.weights import weights_stage  # noqa: E402

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    p = snakemake.params  # noqa: F821
    weights_stage(backbone=dict(p.backbone), weights_dir=p.weights_dir, out=snakemake.output.record)  # noqa: F821
