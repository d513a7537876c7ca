"""Rule weights_checked: every backbone's weights record in one file, written once all are resolved."""

from robustft.pipeline.script_log import rule_log
from robustft.pipeline.weights import checked_weights

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    checked_weights(records=list(snakemake.input.records), out=snakemake.output.checked)  # noqa: F821
