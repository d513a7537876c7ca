"""Rule sweep: the run's WiSE-FT path evaluated at every alpha on every eval split (one model load)."""

import torch

from robustft.pipeline.analysis import sweep_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p = snakemake.input, snakemake.params  # noqa: F821
    sweep_stage(
        manifest=i.manifest,
        backbone_spec=dict(p.backbone),
        run_json=i.run,
        reference_head=i.reference_head,
        eval_pixels={s: i[f"pixels_{s}"] for s in p.splits},
        eval_features={s: i[f"features_{s}"] for s in p.splits},
        alphas=p.alphas,
        batch_size=p.batch_size,
        device=p.device,
        out_logits=snakemake.output.logits,  # noqa: F821
        train_pixels=i.get("train_pixels"),
        train_features=i.get("train_features"),
        fisher_examples=p.fisher_examples,
    )
