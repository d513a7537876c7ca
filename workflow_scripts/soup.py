"""Rule soup: a uniform or greedy model soup of a study's runs, written as a run directory of its own."""

import torch

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.soups import soup_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p, w = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
    soup_stage(
        manifest=i.manifest, backbone_spec=dict(p.backbone), kind=w.kind, source=w.source, runs=list(i.runs),
        reference_head=i.reference_head, val_pixels=i.val_pixels, val_features=i.val_features,
        batch_size=p.batch_size, device=p.device, out_run=snakemake.output.run,  # noqa: F821
    )
