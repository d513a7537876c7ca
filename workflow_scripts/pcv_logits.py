"""Rule pcv_logits: a PCV fold model's ID-validation logits at every alpha."""

import torch

from robustft.pipeline.analysis import pcv_logits_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p = snakemake.input, snakemake.params  # noqa: F821
    pcv_logits_stage(i.manifest, dict(p.backbone), i.run, i.parent, i.reference_head, i.val_pixels, i.val_features,
                     p.alphas, p.batch_size, p.device, snakemake.output.logits)  # noqa: F821
