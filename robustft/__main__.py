"""Command line: ``python -m robustft recommend --id-floor 0.9 [--results results/]`` prints, for a finished results
folder, the (method, variant, alpha, calibration) points with the best OOD accuracy whose ID-validation accuracy
clears the floor, with intervals and the points tied with the best (robustft.recommend)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m robustft", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("recommend", help="best OOD accuracy under an ID floor, checked on ID validation")
    rec.add_argument("--id-floor", required=True,
                     help="an ID-validation accuracy (0.9 = 90 %%) or best-<points> (best-2: at most 2 points below "
                          "the best point's)")
    rec.add_argument("--results", default="results", help="a finished results folder (default: results)")
    rec.add_argument("--study", default=None, help="only this study (<dataset>/<backbone>, as in summary.parquet)")
    rec.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    rec.add_argument("--ci-level", type=float, default=0.95, help="confidence level (default 0.95)")
    rec.add_argument("--top", type=int, default=10, help="rows shown per study besides the tied ones (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from robustft.recommend import print_recommendation, recommend_from_results

    try:
        table = recommend_from_results(args.results, args.id_floor, args.bootstrap, args.ci_level, args.study)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"robustft recommend: {exc}", file=sys.stderr)
        return 2
    print_recommendation(table, top=args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
