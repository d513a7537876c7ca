"""Re-run one fine-tuning of a finished pipeline run, uninterrupted, on that run's own inputs (for tests/test_slurm.py).

    python tests/slurm/replay_finetune.py WORKDIR METHOD VARIANT SEED OUT_RUN_DIR

Does what rule ``finetune`` does (same stage function, same resolved settings, the config's compute.cpu_threads
torch threads), from WORKDIR's config and cached inputs, writing the run into OUT_RUN_DIR (its resume folder beside
it is removed first). The test compares the result with the pipeline's own (possibly cancelled and resumed) run, tensor for tensor.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml


def main(workdir: str, method: str, variant: str, seed: str, out: str) -> None:
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    import torch

    from robustft.config import canonical_json, resolved_variant, validate_config
    from robustft.pipeline.runs import finetune_stage

    root = Path(workdir)
    config = validate_config(yaml.safe_load((root / "config.yaml").read_text()))
    torch.set_num_threads(config["compute"]["cpu_threads"])
    inputs = _rule_inputs(root, config)
    out_dir = Path(out)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".resume"), ignore_errors=True)
    backbone = {k: v for k, v in config["backbone"].items() if k != "templates"}
    finetune_stage(
        manifest=inputs["manifest"], backbone_spec={**backbone, "weights_record": inputs["weights_record"]},
        method=method, variant=variant, seed=int(seed),
        settings=canonical_json(resolved_variant(config, method, variant)),
        train_pixels=inputs["train_pixels"], val_pixels=inputs["val_pixels"], train_features=inputs["train_features"],
        val_features=inputs["val_features"], reference_head=inputs["reference_head"],
        run_json=str(out_dir / "run.json"),
        device=config["training"]["device"], templates=config["backbone"].get("templates"),
    )


def _rule_inputs(root: Path, config: dict) -> dict[str, str]:
    """The input files of rule finetune in ``root`` (found by pattern: one backbone and one dataset per workdir)."""
    results = root / "results"
    domain = config["dataset"]["id_domain"]

    def one(pattern: str) -> str:
        found = sorted(results.glob(pattern))
        if len(found) != 1:
            raise SystemExit(f"expected one {pattern} under {results}, found {found}")
        return str(found[0])

    return {
        "manifest": one("data/*/manifest.parquet"),
        "train_pixels": one(f"pixels/*/*/{domain}_train-*.h5"),
        "val_pixels": one(f"pixels/*/*/{domain}_val-*.h5"),
        "train_features": one(f"features/*/*/{domain}_train-*.h5"),
        "val_features": one(f"features/*/*/{domain}_val-*.h5"),
        "reference_head": one("*/*/reference/head.safetensors"),
        "weights_record": one("weights/*.json"),
    }


if __name__ == "__main__":
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
