"""Rule study_summary: one study's runs in <study>/summary.parquet (one row per run x domain x alpha x calibration)."""

from robustft.pipeline.analysis import summary_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, p = snakemake.input, snakemake.params  # noqa: F821
    summary_stage(
        metrics=list(i.metrics),
        runs=list(i.runs),
        studies=[dict(s) for s in p.studies],
        bootstrap=p.bootstrap,
        ci_level=p.ci_level,
        out=snakemake.output.summary,  # noqa: F821
    )
