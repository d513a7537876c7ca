"""Rule study_summary: one study's runs in <study>/summary.parquet (one row per run x domain x alpha x calibration)."""

from robustft.pipeline.analysis import summary_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, p = snakemake.input, snakemake.params  # noqa: F821
    study = p.studies[0]  # one entry per metrics file, all the same study in this rule
    summary_stage(list(i.metrics), list(i.runs), study["backbone"], study["dataset"], study["id_domain"],
                  list(study["ood_domains"]), p.bootstrap, p.ci_level, snakemake.output.summary)  # noqa: F821
