"""Rule pixel_cache: decode one (domain, split) once into a uint8 HDF5 pixel cache."""

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.stages import pixel_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    w, p = snakemake.wildcards, snakemake.params  # noqa: F821
    pixel_stage(manifest=snakemake.input.manifest, domain=w.domain, split=w.split,  # noqa: F821
                max_per_class=p.max_per_class, backbone_spec=dict(p.backbone), threads=snakemake.threads,  # noqa: F821
                out=snakemake.output.pixels)  # noqa: F821
