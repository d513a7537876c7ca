"""The report: charts (``robustft.report.charts``) and the page that holds them (``robustft.report.page``).

Importing this package is cheap (no Altair), so the Snakemake rule file can read the output names at parse time;
the functions load on first use.
"""

from __future__ import annotations

#: The charts, each written as ``<name>.png`` and ``<name>.vl.json`` beside ``index.html``.
CHART_NAMES = ("id_vs_ood", "accuracy_change", "calibration", "training_curves", "per_class_damage",
               "effective_robustness")
#: The leaderboard files beside ``index.html``.
LEADERBOARD_FILES = ("leaderboard.txt", "leaderboard.csv")

_API = {
    "write_report": "page", "print_leaderboard": "page", "report_files": "page", "build_charts": "page",
    "render_page": "page", "load_curves": "page", "load_train_logs": "page",
    "id_vs_ood_chart": "charts", "id_vs_ood_points": "charts", "leaderboard": "charts",
    "leaderboard_text": "charts", "leaderboard_display": "charts", "accuracy_change": "charts",
    "accuracy_change_chart": "charts", "calibration_chart": "charts", "training_curves": "charts",
    "training_curves_chart": "charts", "method_colours": "charts", "per_class_damage": "charts",
    "per_class_damage_chart": "charts",
}

__all__ = ["CHART_NAMES", "LEADERBOARD_FILES", *_API]


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f"robustft.report.{_API[name]}"), name)
    raise AttributeError(f"module 'robustft.report' has no attribute {name!r}")
