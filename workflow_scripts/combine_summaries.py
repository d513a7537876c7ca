"""Rule summary: the config's study summaries side by side in results/summary.parquet."""

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.studies import combine_summaries

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    combine_summaries(summaries=list(snakemake.input.studies), out=snakemake.output.summary)  # noqa: F821
