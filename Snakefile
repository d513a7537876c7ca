# robustft: robust fine-tuning benchmarks under distribution shift.
# This file is a table of contents: config, rule files, and the final target.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/weights.smk"
include: "rules/data.smk"
include: "rules/features.smk"
include: "rules/reference.smk"
include: "rules/finetune.smk"
include: "rules/sweeps.smk"
include: "rules/calibration.smk"
include: "rules/soups.smk"
include: "rules/summary.smk"
include: "rules/analyses.smk"
include: "rules/report.smk"


localrules:
    weights,
    fetch_pacs,
    study_summary,
    summary,
    report,


rule all:
    default_target: True
    input:
        str(rules.summary.output.summary),  # plain paths (see rules/report.smk)
        str(rules.report.output.index),


report: "report/workflow.rst"
