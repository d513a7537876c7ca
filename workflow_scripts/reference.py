"""Rule reference: the reference head (zero-shot head for CLIP, linear probe for classifier backbones)."""

import torch

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.stages import reference_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p, o = snakemake.input, snakemake.params, snakemake.output  # noqa: F821
    reference_stage(manifest=i.manifest, backbone_spec=dict(p.backbone), train_features=i.train, val_features=i.val,
                    reference_cfg=dict(p.reference), templates=p.templates, out_head=o.head, out_json=o.info)
