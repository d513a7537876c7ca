"""Rule paired_tests: results/analysis/paired_tests.parquet (selected points vs the reference and full fine-tuning)."""

from robustft.pipeline.script_log import rule_log
from robustft.significance import paired_tests_stage

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, p = snakemake.input, snakemake.params  # noqa: F821
    paired_tests_stage(summary=i.summary, metrics=list(i.metrics), run_studies=list(p.run_studies),
                       bootstrap=p.bootstrap, ci_level=p.ci_level, out=snakemake.output.table)  # noqa: F821
