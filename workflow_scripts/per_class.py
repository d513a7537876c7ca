"""Rule per_class: one study's per-class accuracy changes against the reference model (robustft.per_class)."""

from robustft.per_class import per_class_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i = snakemake.input  # noqa: F821
    per_class_stage(manifest=i.manifest, summary=i.summary, sweep_logits=list(i.logits), runs=list(i.runs),
                    out=snakemake.output.table)  # noqa: F821
