"""Rule finetune: one (method, variant, seed) fine-tuned on the ID training split; resumes when requeued."""

import torch

from robustft.pipeline.runs import finetune_stage
from robustft.pipeline.script_log import rule_log

# training.devices > 1 spawns a process per rank, which imports this script again as __mp_main__: run once
if __name__ == "__main__":
    with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
        torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
        i, p, w = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
        finetune_stage(
            manifest=i.manifest, backbone_spec=dict(p.backbone), method=w.method, variant=w.variant, seed=int(w.seed),
            settings=p.settings, train_pixels=i.train_pixels, val_pixels=i.val_pixels, train_features=i.train_features,
            val_features=i.val_features, reference_head=i.reference_head, run_json=snakemake.output.run,  # noqa: F821
            device=p.device, templates=p.templates,
        )
