"""Rule report: results/report/ (index.html, charts as PNG and Vega-Lite JSON, the leaderboard); prints the
leaderboard to the terminal."""

from pathlib import Path

from robustft.io.tables import read_table_metadata
from robustft.pipeline.script_log import rule_log
from robustft.report.page import print_leaderboard, write_report

with rule_log(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    i, o = snakemake.input, snakemake.output  # noqa: F821
    skipped = [path for manifest in i.manifests for path in read_table_metadata(manifest)["skipped"]]
    description = {**snakemake.params.description, "skipped_images": skipped}  # noqa: F821
    write_report(i.summary, list(i.curves), list(i.train_logs), description, out_dir=Path(o.index).parent)

# after rule_log has handed stdout back: Snakemake does not capture a script's stdout, so this reaches the terminal
print_leaderboard(snakemake.output.leaderboard)  # noqa: F821
