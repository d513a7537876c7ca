"""Rule pixel_cache: decode one (domain, split) once into a uint8 HDF5 pixel cache."""

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.stages import pixel_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    w, p = snakemake.wildcards, snakemake.params  # noqa: F821
    pixel_stage(snakemake.input.manifest, w.domain, w.split, p.max_per_class, dict(p.backbone),  # noqa: F821
                snakemake.threads, snakemake.output.pixels)  # noqa: F821
