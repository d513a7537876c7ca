"""Rule calibrate: ALG / PCV logit-scale calibration and metrics with bootstrap CIs for one run."""

import torch

from robustft.pipeline.analysis import calibrate_stage
from robustft.pipeline.script_log import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(snakemake.params.cpu_threads)  # noqa: F821
    i, p, o = snakemake.input, snakemake.params, snakemake.output  # noqa: F821
    calibrate_stage(
        manifest=i.manifest,
        run_json=i.run,
        sweep_logits_path=i.logits,
        id_domain=p.id_domain,
        gamma_source=p.gamma_source,
        bootstrap=p.bootstrap,
        ci_level=p.ci_level,
        out_metrics=o.metrics,
        out_curve=o.curve,
        pcv_fold_logits=list(i.get("pcv", [])),
    )
