"""Rule recommendation: results/analysis/recommendation.parquet (best OOD points under the configured ID floor)."""

from robustft.pipeline.script_log import rule_log
from robustft.recommend import recommendation_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, p = snakemake.input, snakemake.params  # noqa: F821
    recommendation_stage(summary=i.summary, metrics=list(i.metrics), run_studies=list(p.run_studies),
                         id_floor=p.id_floor, bootstrap=p.bootstrap, ci_level=p.ci_level,
                         out=snakemake.output.table)  # noqa: F821
