"""Rule features: encode a pixel cache with the pre-trained encoder into an HDF5 feature cache."""

import torch

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.stages import features_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    p = snakemake.params  # noqa: F821
    features_stage(pixels=snakemake.input.pixels, backbone_spec=dict(p.backbone), batch_size=p.batch_size,  # noqa: F821
                   device=p.device, out=snakemake.output.features)  # noqa: F821
