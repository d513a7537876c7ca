"""Data stages: manifest, pixel cache, feature cache, reference head."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from robustft.backbones import build_backbone
from robustft.backbones.base import Backbone
from robustft.data.build import build_manifest, verify_manifest_files
from robustft.data.manifest import MANIFEST_COLUMNS, DatasetError, select_rows
from robustft.data.pixels import pixel_cache_attrs, write_pixel_cache
from robustft.data.registry import get_adapter
from robustft.features import FEATURE_COLUMNS, FeatureChunks, extract_features
from robustft.heads import fit_linear_probe, head_accuracy
from robustft.io.arrays import open_arrays, read_attrs
from robustft.io.atomic import atomic_path, write_json_atomic
from robustft.io.progress import ProgressLog
from robustft.io.tables import read_table, read_table_metadata, write_table

log = logging.getLogger("robustft")


def manifest_stage(
    *, dataset: str, root: str, domains: list[str], split: dict[str, Any], on_bad_image: str, threads: int, out: str,
    expected_counts: dict[str, int] | None = None,
) -> None:
    """Scan, check, split and label the dataset (``threads`` decoding threads); write the manifest Parquet.

    ``expected_counts`` (``dataset.expected_counts``) replaces the adapter's published image counts; ``{}`` checks
    none. Its keys are ``domain`` or ``domain/split`` and must name domains of ``domains``.
    """
    adapter = get_adapter(dataset)
    if expected_counts is not None:
        foreign = sorted(k for k in expected_counts if k.partition("/")[0] not in domains)
        if foreign:
            raise DatasetError(f"dataset.expected_counts: key {foreign[0]!r} names no scanned domain; "
                               f"domains: {sorted(domains)}")
        adapter.expected_counts = {str(k): int(v) for k, v in expected_counts.items()}
    frame, meta = build_manifest(
        adapter, root, domains, split["val_fraction"], split["test_fraction"], split["seed"],
        on_bad_image=on_bad_image, threads=threads,
    )
    write_table(out, frame, meta)
    counts = frame[~frame["skipped"]].groupby(["domain", "split"]).size()
    log.info("manifest %s: %d images (%d skipped)\n%s", out, len(frame), int(frame["skipped"].sum()), counts)


def read_manifest(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The validated manifest table and its metadata."""
    return read_table(path, MANIFEST_COLUMNS), read_table_metadata(path)


def pixel_stage(
    *, manifest: str, domain: str, split: str, max_per_class: int | None, backbone_spec: dict, threads: int, out: str
) -> None:
    """Decode one (domain, split) of the manifest into a uint8 pixel cache at the backbone's preprocessing."""
    frame, meta = read_manifest(manifest)
    rows = select_rows(frame, domain, split, max_per_class)
    if rows.empty:
        raise DatasetError(f"domain {domain!r} has no {split} images in {manifest}")
    verify_manifest_files(rows, meta["root"])
    pre = build_backbone(backbone_spec).preprocessing
    attrs = pixel_cache_attrs(meta["manifest_hash"], pre.pixel_key, domain, split, max_per_class)
    border = get_adapter(meta["dataset"]).border_crop(domain)
    with ProgressLog(f"decode {domain}_{split}", len(rows)) as progress:
        write_pixel_cache(rows, meta["root"], out, pre.image_size, pre.interpolation, attrs, threads=threads,
                          progress=progress.update, border=border)
    log.info("pixel cache %s: %d images at %s", out, len(rows), pre.pixel_key)


def feature_attrs(pixel_attrs: dict[str, Any], backbone: Backbone) -> dict[str, Any]:
    """Provenance of a feature cache: its pixel cache's (manifest hash, domain, split, caps) plus the backbone."""
    keep = ("manifest_hash", "pixel_key", "domain", "split", "max_per_class")
    return {"kind": "features", **{k: pixel_attrs[k] for k in keep}, **backbone.identity()}


def features_stage(*, pixels: str, backbone_spec: dict, batch_size: int, device: str, out: str) -> None:
    """Encode a pixel cache with the pre-trained encoder into a feature cache."""
    backbone = build_backbone(backbone_spec)
    with open_arrays(pixels, ()) as handle:
        pixel_attrs = read_attrs(handle)
    if pixel_attrs.get("pixel_key") != backbone.preprocessing.pixel_key:
        raise DatasetError(f"{pixels}: stale pixel cache for preprocessing {backbone.preprocessing.pixel_key}")
    encoder = backbone.build_encoder()
    n = int(pixel_attrs["n_rows"])
    with ProgressLog(f"encode {Path(pixels).stem}", n) as progress:
        extract_features(encoder, pixels, out, backbone.preprocessing, feature_attrs(pixel_attrs, backbone),
                         batch_size=batch_size, device=device, progress=progress.update)
    log.info("features %s: %d x %d", out, n, backbone.feature_dim)


def expected_feature_attrs(manifest_meta: dict[str, Any], backbone: Backbone) -> dict[str, Any]:
    """What a feature cache must carry to be reused with this manifest and backbone."""
    return {"manifest_hash": manifest_meta["manifest_hash"], **backbone.identity()}


def reference_stage(
    *, manifest: str, backbone_spec: dict, train_features: str, val_features: str, reference_cfg: dict, templates: str,
    out_head: str, out_json: str,
) -> None:
    """The reference head: CLIP zero-shot head from prompts, or a linear probe chosen on ID validation.

    Features are read in chunks (:class:`FeatureChunks`): memory is bounded by a chunk, not by the ID train split.
    """
    _, meta = read_manifest(manifest)
    backbone = build_backbone(backbone_spec)
    expected = expected_feature_attrs(meta, backbone)
    train = FeatureChunks(train_features, expected)
    val = FeatureChunks(val_features, expected)
    num_classes = len(meta["class_names"])
    info: dict[str, Any] = {"kind": backbone.reference_head_kind, "backbone": backbone.identity(),
                            "class_names": meta["class_names"], "manifest_hash": meta["manifest_hash"]}
    if backbone.reference_head_kind == "zeroshot":
        from robustft.backbones.templates import get_templates

        weight = backbone.zeroshot_head_weights(meta["prompt_names"], get_templates(templates)).float()
        bias = torch.zeros(num_classes)
        info["templates"] = templates
    else:
        fit = fit_linear_probe(train, val, num_classes, reference_cfg["l2_grid"], reference_cfg["max_iter"])
        weight, bias = fit.weight, fit.bias
        info.update({"l2": fit.l2, "l2_grid_val_accuracy": fit.grid})
    info["val_accuracy"] = head_accuracy(val, weight, bias, normalize=backbone.features_normalized)
    with atomic_path(out_head) as tmp:
        save_file({"head.weight": weight.contiguous(), "head.bias": bias.contiguous()}, str(tmp))
    write_json_atomic(out_json, info)
    log.info("reference head (%s): ID val accuracy %.4f", backbone.reference_head_kind, info["val_accuracy"])


__all__ = ["FEATURE_COLUMNS", "features_stage", "manifest_stage", "pixel_stage", "reference_stage", "read_manifest"]
