"""Rule summary: every run's metrics in results/summary.parquet (one row per run x domain x alpha x calibration)."""

from robustft.pipeline.analysis import summary_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, p = snakemake.input, snakemake.params  # noqa: F821
    summary_stage(list(i.metrics), list(i.runs), p.backbone, p.dataset, p.id_domain, list(p.ood_domains),
                  p.bootstrap, p.ci_level, snakemake.output.summary)  # noqa: F821
