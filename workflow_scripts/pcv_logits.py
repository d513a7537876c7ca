"""Rule pcv_logits: a PCV fold model's ID-validation logits at every alpha, and the reference model's."""

import torch

from robustft.pipeline.analysis import pcv_logits_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p = snakemake.input, snakemake.params  # noqa: F821
    pcv_logits_stage(
        manifest=i.manifest,
        backbone_spec=dict(p.backbone),
        run_json=i.run,
        parent_run_json=i.parent,
        reference_head=i.reference_head,
        val_pixels=i.val_pixels,
        val_features=i.val_features,
        alphas=p.alphas,
        batch_size=p.batch_size,
        device=p.device,
        out=snakemake.output.logits,  # noqa: F821
    )
