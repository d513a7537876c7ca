"""Rule finetune_pcv: a pseudo-cross-validation fold model for PCV calibration of a class-subset run."""

import torch

from robustft.pipeline.runs import pcv_finetune_stage
from robustft.pipeline.script_log import rule_log

# training.devices > 1 spawns a process per rank, which imports this script again as __mp_main__: run once
if __name__ == "__main__":
    with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
        torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
        i, p, w = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
        pcv_finetune_stage(
            manifest=i.manifest, backbone_spec=dict(p.backbone), method=w.method, variant=w.variant, seed=int(w.seed),
            settings=p.settings, fold=int(w.fold), n_folds=p.folds, fraction=p.fraction, train_pixels=i.train_pixels,
            val_pixels=i.val_pixels, train_features=i.train_features, val_features=i.val_features,
            reference_head=i.reference_head, run_json=snakemake.output.run, device=p.device,  # noqa: F821
            templates=p.templates,
        )
