"""Rule effective_robustness: results/analysis/effective_robustness.parquet (ER of every point, a baseline per domain)."""

from robustft.pipeline.script_log import rule_log
from robustft.robustness import effective_robustness_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, p = snakemake.input, snakemake.params  # noqa: F821
    effective_robustness_stage(summary=i.summary, bootstrap=p.bootstrap, ci_level=p.ci_level,
                               out=snakemake.output.table)  # noqa: F821
