"""Rule sweep: the run's WiSE-FT path evaluated at every alpha on every eval split (one model load)."""

import torch

from robustft.pipeline.analysis import sweep_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p = snakemake.input, snakemake.params  # noqa: F821
    sweep_stage(
        i.manifest, dict(p.backbone), i.run, i.reference_head,
        {s: i[f"pixels_{s}"] for s in p.splits}, {s: i[f"features_{s}"] for s in p.splits},
        p.alphas, p.batch_size, p.device, snakemake.output.logits,  # noqa: F821
        fisher_pixels=i.get("fisher_pixels"), fisher_examples=p.fisher_examples,
    )
