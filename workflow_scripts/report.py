"""Rule report: results/report/ (index.html, charts as PNG and Vega-Lite JSON, the leaderboard); prints the
leaderboard to the terminal."""

from pathlib import Path

from robustft.io.tables import read_table_metadata
from robustft.pipeline.script_log import rule_log
from robustft.report.page import print_leaderboard, write_report

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    skipped = [path for manifest in i.manifests for path in read_table_metadata(manifest)["skipped"]]
    write_report(
        summary_path=i.summary,
        curve_paths=list(i.curves),
        train_log_paths=list(i.train_logs),
        config={**p.description, "skipped_images": skipped},
        out_dir=Path(o.index).parent,
        run_studies=list(p.run_studies),  # the study of each run, in the order of the curves and train logs
        analysis_paths={name: getattr(i, name) for name in ("effective_robustness", "paired_tests", "recommendation")},
        per_class_paths=list(i.per_class),
    )

# after rule_log has handed stdout back: Snakemake does not capture a script's stdout, so this reaches the terminal
print_leaderboard(snakemake.output.leaderboard)  # noqa: F821
