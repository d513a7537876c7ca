"""Rule finetune: one (method, variant, seed) fine-tuned on the ID training split; resumes when requeued."""

import torch

from robustft.pipeline.runs import finetune_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p, w = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
    finetune_stage(i.manifest, dict(p.backbone), w.method, w.variant, int(w.seed), p.settings,
                   i.train_pixels, i.val_pixels, i.train_features, i.val_features, i.reference_head,
                   snakemake.output.run, p.device)  # noqa: F821
