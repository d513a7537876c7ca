"""Rule finetune_pcv: a pseudo-cross-validation fold model for PCV calibration of a class-subset run."""

import torch

from robustft.pipeline.runs import pcv_finetune_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p, w = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
    pcv_finetune_stage(i.manifest, dict(p.backbone), w.method, w.variant, int(w.seed), p.settings, int(w.fold),
                       p.folds, p.fraction, i.train_pixels, i.val_pixels, i.train_features, i.val_features,
                       i.reference_head, snakemake.output.run, p.device)  # noqa: F821
