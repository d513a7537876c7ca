# Summaries: one per study (results/<dataset>/<backbone>/summary.parquet: its runs x domains x alphas x
# calibrations), and results/summary.parquet, the studies of this config side by side. A study's summary depends on
# its own runs only, so running another config never rewrites it.


rule study_summary:
    input:
        unpack(study_summary_inputs),
    output:
        summary="results/{dataset}/{backbone}/summary.parquet",
    params:
        # one entry per metrics file (robustft.pipeline.analysis.summary_stage's ``studies``)
        studies=lambda wc, input: [study_description(study(wc))] * len(input.metrics),
        bootstrap=config["eval"]["bootstrap"],
        ci_level=config["eval"]["ci_level"],
        code=code_version("summary.py"),
    log:
        "results/logs/study_summary/{dataset}/{backbone}.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/summary.py"


rule summary:
    input:
        studies=[rules.study_summary.output.summary.format(dataset=s["dataset"], backbone=s["backbone"])
                 for s in STUDIES],
    output:
        summary="results/summary.parquet",
    params:
        code=code_version("combine_summaries.py"),
    log:
        "results/logs/summary.log",
    conda:
        "../envs/robustft.yaml"
    script:
        "../workflow_scripts/combine_summaries.py"
