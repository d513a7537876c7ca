"""Real-benchmark adapters (ImageNet + 5 shifts, DomainNet) on miniature copies of their on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robustft.data.adapters import EvalProjection
from robustft.data.classlists import (
    IMAGENET_A_SUBLIST,
    IMAGENET_R_SUBLIST,
    domainnet_classes,
    imagenet_openai_classnames,
    imagenet_wnids,
    objectnet_mapping,
)
from robustft.data.domainnet import DOMAINNET_COUNTS, DomainNetAdapter
from robustft.data.imagenet import IMAGENET_COUNTS, ImageNetAdapter
from robustft.data.manifest import MANIFEST_COLUMNS, DatasetError
from robustft.data.registry import DATASETS, get_adapter

WNIDS = imagenet_wnids()


def _image(path: Path, value: int = 0, suffix_format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value % 256, dtype=np.uint8)).save(path, format=suffix_format)


# ----------------------------------------------------------------------------------------------------------------
# Packaged class lists


def test_imagenet_class_lists():
    assert len(WNIDS) == 1000 and list(WNIDS) == sorted(set(WNIDS))
    names = imagenet_openai_classnames()
    assert len(names) == 1000
    assert (names[0], names[409], names[530], names[954], names[999]) == (
        "tench", "analog clock", "digital clock", "banana", "toilet paper")
    assert WNIDS[0] == "n01440764" and WNIDS[409] == "n02708093"


@pytest.mark.parametrize("sublist", [IMAGENET_R_SUBLIST, IMAGENET_A_SUBLIST])
def test_subset_lists_are_200_sorted_unique(sublist):
    assert len(sublist) == 200
    assert list(sublist) == sorted(set(sublist))
    assert 0 <= min(sublist) and max(sublist) < 1000
    # the sorted wnid folders of ImageNet-R/-A enumerate the sublist in order (ImageFolder labels = positions)
    wnids = [WNIDS[i] for i in sublist]
    assert wnids == sorted(wnids)


def test_subset_lists_match_wise_ft_ends():
    assert IMAGENET_R_SUBLIST[:5] == (1, 2, 4, 6, 8) and IMAGENET_R_SUBLIST[-3:] == (981, 983, 988)
    assert IMAGENET_A_SUBLIST[:5] == (6, 11, 13, 15, 17) and IMAGENET_A_SUBLIST[-3:] == (986, 987, 988)


def test_objectnet_mapping():
    mapping = objectnet_mapping()
    folders = [e["folder"] for e in mapping]
    assert len(mapping) == 113 and folders == sorted(set(folders))
    indices = [i for e in mapping for i in e["imagenet_indices"]]
    assert len(indices) == len(set(indices)) == 125
    for entry in mapping:
        assert [WNIDS[i] for i in entry["imagenet_indices"]] == entry["imagenet_wnids"]
    by_folder = {e["folder"]: e for e in mapping}
    assert by_folder["alarm_clock"]["imagenet_indices"] == [409, 530]
    assert by_folder["banana"]["imagenet_indices"] == [954]
    assert by_folder["chair"]["imagenet_indices"] == [423, 559, 765]  # barber, folding, rocking chair


def test_domainnet_class_list():
    classes = domainnet_classes()
    assert len(classes) == len(set(classes)) == 345
    assert classes[0] == "aircraft_carrier" and classes[327] == "t-shirt" and classes[344] == "zigzag"


def test_registry():
    assert isinstance(get_adapter("imagenet"), ImageNetAdapter)
    assert isinstance(get_adapter("domainnet"), DomainNetAdapter)
    assert {"imagefolder", "pacs", "imagenet", "domainnet"} <= set(DATASETS)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet family

IN_CLASSES = [1, 6, 11, 409, 530, 954]  # in R (1, 6, 11), in A (6, 11), ObjectNet alarm clock / banana
R_CLASSES = [1, 2, 4]
A_CLASSES = [6, 11]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet_parent")
    for index in IN_CLASSES:
        for k in range(10):
            _image(root / "imagenet" / "train" / WNIDS[index] / f"{WNIDS[index]}_{k}.JPEG", k, "JPEG")
        for k in range(2):
            _image(root / "imagenet" / "val" / WNIDS[index] / f"ILSVRC2012_val_{index:04d}{k}.JPEG", k, "JPEG")
    for index in IN_CLASSES[:3]:  # V2 as downloaded: folders named by class index
        _image(root / "imagenetv2-matched-frequency-format-val" / str(index) / "a.jpeg", index, "JPEG")
    for index in IN_CLASSES[:2]:  # Sketch under its download name
        _image(root / "sketch" / WNIDS[index] / "sketch_1.JPEG", index, "JPEG")
    for index in R_CLASSES:
        for k in range(2):
            _image(root / "imagenet-r" / WNIDS[index] / f"art_{k}.jpg", k, "JPEG")
    (root / "imagenet-r" / "README.txt").write_text("ImageNet-R\n")  # top-level files are not classes
    for index in A_CLASSES:
        _image(root / "imagenet_a" / WNIDS[index] / "0.jpg", index, "JPEG")
    for folder in ("alarm_clock", "banana", "squeegee"):  # squeegee maps to no ImageNet class: dropped
        for k in range(2):
            _image(root / "objectnet-1.0" / "images" / folder / f"{k}.png", k)
    return root


@pytest.fixture(scope="module")
def imagenet_scan(imagenet_root) -> pd.DataFrame:
    return ImageNetAdapter().scan(imagenet_root, None)


def test_imagenet_scan_layouts(imagenet_scan):
    frame = imagenet_scan
    assert sorted(frame["domain"].unique()) == sorted(
        ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet"])
    counts = frame.groupby(["domain", "split"]).size().to_dict()
    assert counts == {
        ("imagenet", "train"): 60, ("imagenet", "test"): 12, ("imagenet_v2", "test"): 3,
        ("imagenet_sketch", "test"): 2, ("imagenet_r", "test"): 6, ("imagenet_a", "test"): 2, ("objectnet", "test"): 4,
    }
    v2 = frame[frame["domain"] == "imagenet_v2"].sort_values("class_name")
    assert sorted(v2["class_name"]) == sorted(WNIDS[i] for i in IN_CLASSES[:3])  # index folders -> wnids
    assert all(p.startswith("imagenetv2-matched-frequency-format-val/") for p in v2["path"])
    assert set(frame.loc[frame["domain"] == "objectnet", "class_name"]) == {"alarm_clock", "banana"}
    assert all(p.startswith("objectnet-1.0/images/") for p in frame.loc[frame["domain"] == "objectnet", "path"])
    assert frame["is_image_suffix"].all() and (frame["bytes"] > 0).all()
    assert not frame["path"].str.startswith("/").any()


def test_imagenet_domain_subset_and_missing(imagenet_root, tmp_path):
    adapter = ImageNetAdapter()
    only = adapter.scan(imagenet_root, ["imagenet_r", "objectnet"])
    assert set(only["domain"]) == {"imagenet_r", "objectnet"}
    with pytest.raises(DatasetError, match="unknown ImageNet domain 'imagenet_c'"):
        adapter.scan(imagenet_root, ["imagenet_c"])
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="domain imagenet_sketch: none of the folders"):
        adapter.scan(tmp_path, ["imagenet_sketch"])
    with pytest.raises(DatasetError, match="train"):
        adapter.scan(tmp_path, ["imagenet"])


def test_imagenet_rejects_unknown_folders(tmp_path):
    _image(tmp_path / "imagenet_v2" / "n01440764" / "a.jpeg")
    with pytest.raises(DatasetError, match="named 0..999"):
        ImageNetAdapter().scan(tmp_path, ["imagenet_v2"])
    _image(tmp_path / "imagenet_r" / WNIDS[0] / "a.jpg")  # tench (index 0) is not an ImageNet-R class
    with pytest.raises(DatasetError, match="unexpected class folder"):
        ImageNetAdapter().scan(tmp_path, ["imagenet_r"])


def test_imagenet_counts(imagenet_scan, monkeypatch):
    assert IMAGENET_COUNTS["imagenet/train"] == 1_281_167 and IMAGENET_COUNTS["objectnet"] == 18_574
    adapter = ImageNetAdapter()
    with pytest.raises(DatasetError, match=r"domain imagenet \(train split\): found 60 images, expected 1281167"):
        adapter.check_counts(imagenet_scan)
    exact = {"imagenet/train": 60, "imagenet/test": 12, "imagenet_v2": 3, "imagenet_sketch": 2,
             "imagenet_r": 6, "imagenet_a": 2, "objectnet": 4}
    ImageNetAdapter(expected_counts=exact).check_counts(imagenet_scan)
    with pytest.raises(DatasetError, match="domain objectnet: found 4 images, expected 5"):
        ImageNetAdapter(expected_counts={**exact, "objectnet": 5}).check_counts(imagenet_scan)
    # domains that were not scanned are not checked
    ImageNetAdapter().check_counts(imagenet_scan[imagenet_scan["domain"] == "nothing"])


def test_imagenet_splits_and_labels(imagenet_scan):
    adapter = ImageNetAdapter()
    assert adapter.has_official_splits()
    split = adapter.assign_splits(imagenet_scan, val_fraction=0.2, seed=3)
    imagenet = split[split["domain"] == "imagenet"]
    per_class = imagenet.groupby(["class_name", "split"]).size().unstack()
    assert (per_class["train"] == 8).all() and (per_class["val"] == 2).all() and (per_class["test"] == 2).all()
    # val comes from the train folder only, test is exactly the val folder; shifts are test-only
    assert imagenet.loc[imagenet["split"] == "val", "path"].str.contains("/train/").all()
    assert imagenet.loc[imagenet["split"] == "test", "path"].str.contains("/val/").all()
    assert (split.loc[split["domain"] != "imagenet", "split"] == "test").all()
    assert split.equals(adapter.assign_splits(imagenet_scan, val_fraction=0.2, seed=3))  # seeded
    assert not split.equals(adapter.assign_splits(imagenet_scan, val_fraction=0.2, seed=4))

    manifest = adapter.finalize(split)
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert list(manifest["row_id"]) == list(range(len(manifest)))
    labels = manifest.groupby(["domain", "class_name"])["label"].unique().map(lambda v: v.tolist()).to_dict()
    for index in IN_CLASSES:
        assert labels[("imagenet", WNIDS[index])] == [index]
    assert labels[("imagenet_v2", WNIDS[6])] == [6]
    assert labels[("imagenet_sketch", WNIDS[1])] == [1]
    for index in R_CLASSES:  # 0..199, the position in the sublist
        assert labels[("imagenet_r", WNIDS[index])] == [IMAGENET_R_SUBLIST.index(index)]
    assert labels[("imagenet_r", WNIDS[4])] == [2]
    assert labels[("imagenet_a", WNIDS[6])] == [0] and labels[("imagenet_a", WNIDS[11])] == [1]
    assert labels[("objectnet", "alarm_clock")] == [0] and labels[("objectnet", "banana")] == [2]
    assert adapter.class_names(imagenet_scan) == list(WNIDS)


def test_imagenet_prompts_and_hints():
    adapter = ImageNetAdapter()
    assert adapter.prompt_names([WNIDS[0], WNIDS[409]]) == ["tench", "analog clock"]
    assert len(adapter.prompt_names(adapter.class_names(None))) == 1000
    assert adapter.eval_prompt_names("objectnet")[:2] == ["Alarm clock", "Backpack"]
    assert adapter.eval_prompt_names("imagenet_r")[0] == "goldfish"
    assert adapter.border_crop("objectnet") == 2
    assert all(adapter.border_crop(d) == 0 for d in ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_r"))


def test_projection_class_subset_r_and_a():
    adapter = ImageNetAdapter()
    for domain, sublist in (("imagenet_r", IMAGENET_R_SUBLIST), ("imagenet_a", IMAGENET_A_SUBLIST)):
        projection = adapter.projection(domain)
        assert projection.class_subset == tuple(sublist) and projection.groups is None
        logits = np.zeros((3, 1000), dtype=np.float32)
        logits[0, 0] = 9.0  # tench (in neither subset) wins 1000-way but is masked out
        logits[0, sublist[5]] = 5.0
        logits[1, sublist[199]] = 1.0
        logits[2, sublist[0]] = 2.0
        logits[2, sublist[0] + 1 if sublist[0] + 1 not in sublist else 999] = 3.0
        projected = projection.apply(logits)
        assert projected.shape == (3, 200)
        assert projected.argmax(axis=1).tolist() == [5, 199, 0]
        assert logits.argmax(axis=1)[0] == 0  # without the mask the answer is a class outside the subset
    assert adapter.projection("imagenet") == EvalProjection()
    assert adapter.projection("imagenet_sketch") == EvalProjection()


def test_projection_objectnet_max():
    adapter = ImageNetAdapter()
    projection = adapter.projection("objectnet")
    assert projection.class_subset is None and len(projection.groups) == 113
    assert projection.groups[0] == (409, 530)  # alarm clock = max(analog clock, digital clock)
    logits = np.full((2, 1000), -1.0, dtype=np.float32)
    logits[0, 530] = 4.0  # digital clock -> Alarm clock (label 0)
    logits[0, 409] = 1.0
    logits[1, 954] = 2.0  # banana -> Banana (label 2)
    logits[1, 0] = 7.0  # tench maps to no ObjectNet class: ignored
    projected = projection.apply(logits)
    assert projected.shape == (2, 113)
    assert projected[0, 0] == 4.0 and projected[1, 2] == 2.0
    assert projected.argmax(axis=1).tolist() == [0, 2]
    chair = [e["folder"] for e in objectnet_mapping()].index("chair")
    logits = np.zeros((1, 1000), dtype=np.float32)
    logits[0, 765] = 3.0  # rocking chair
    assert projection.apply(logits).argmax(axis=1).tolist() == [chair]


# ----------------------------------------------------------------------------------------------------------------
# DomainNet

DN_CLASSES = ["aircraft_carrier", "t-shirt", "zigzag"]


def _domainnet(root: Path, domains=("real", "sketch"), per_class=(6, 3)) -> Path:
    classes = domainnet_classes()
    for domain in domains:
        for split, n in zip(("train", "test"), per_class):
            lines = []
            for name in DN_CLASSES:
                for k in range(n):
                    rel = f"{domain}/{name}/{domain}_{split}_{k:03d}.jpg"
                    _image(root / rel, k, "JPEG")
                    lines.append(f"{rel} {classes.index(name)}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
        _image(root / domain / DN_CLASSES[0] / "unlisted.jpg")  # not in the split files: ignored
    return root


def test_domainnet_scan_splits_labels(tmp_path):
    root = _domainnet(tmp_path)
    adapter = DomainNetAdapter()
    assert adapter.has_official_splits()
    scanned = adapter.scan(root, None)
    assert set(scanned["domain"]) == {"real", "sketch"}
    assert scanned.groupby(["domain", "split"]).size().to_dict() == {
        ("real", "test"): 9, ("real", "train"): 18, ("sketch", "test"): 9, ("sketch", "train"): 18}
    assert not scanned["path"].str.contains("unlisted").any()
    assert adapter.class_names(scanned) == list(domainnet_classes())
    split = adapter.assign_splits(scanned, val_fraction=0.34, seed=0)
    sizes = split.groupby(["domain", "class_name", "split"]).size()
    assert (sizes.xs("val", level="split") == 2).all() and (sizes.xs("train", level="split") == 4).all()
    assert (sizes.xs("test", level="split") == 3).all()
    manifest = adapter.finalize(split)
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert (manifest["label"] == manifest["official_label"]).all()
    assert set(manifest["label"]) == {0, 327, 344}
    assert adapter.prompt_names(["aircraft_carrier", "teddy-bear", "t-shirt", "The_Eiffel_Tower"]) == [
        "aircraft carrier", "teddy bear", "t-shirt", "The Eiffel Tower"]


def test_domainnet_counts_and_missing_files(tmp_path):
    assert sum(DOMAINNET_COUNTS.values()) == 586_575
    root = _domainnet(tmp_path, domains=("painting",))
    adapter = DomainNetAdapter()
    scanned = adapter.scan(root, ["painting"])
    with pytest.raises(DatasetError, match="domain painting: found 27 images, expected 72266"):
        adapter.check_counts(scanned)
    DomainNetAdapter(expected_counts={"painting": 27, "real": 5}).check_counts(scanned)  # real not scanned
    (root / "painting" / "zigzag" / "painting_test_001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"lists 9 images, found 8 \(1 missing, e.g. .*painting_test_001.jpg\)"):
        adapter.scan(root, ["painting"])
    (root / "clipart").mkdir()
    with pytest.raises(DatasetError, match="split file not found"):
        adapter.scan(root, ["clipart"])
    with pytest.raises(DatasetError, match="unknown DomainNet domain"):
        adapter.scan(root, ["photo"])


def test_dangling_symlinks_are_reported_by_the_imagenet_and_domainnet_builds(tmp_path):
    """A listed file that cannot be read stops the build naming it, or is a recorded skip (not silently dropped)."""
    from robustft.data.build import build_manifest

    imagenet = tmp_path / "in"
    for k in range(3):
        _image(imagenet / "imagenet_a" / WNIDS[6] / f"{k}.jpg", k, "JPEG")
    (imagenet / "imagenet_a" / WNIDS[6] / "3.jpg").symlink_to("/nonexistent/3.jpg")
    counts = {"imagenet_a": 4}
    scanned = ImageNetAdapter(expected_counts=counts).scan(imagenet, ["imagenet_a"])
    assert sorted(scanned["bytes"] < 0) == [False, False, False, True]
    with pytest.raises(DatasetError, match=r"unreadable file .*imagenet_a/n01498041/3.jpg: dangling symlink"):
        build_manifest(ImageNetAdapter(expected_counts=counts), imagenet, ["imagenet_a"], 0.0, 0.0, 0)
    frame, _ = build_manifest(ImageNetAdapter(expected_counts=counts), imagenet, ["imagenet_a"], 0.0, 0.0, 0,
                              on_bad_image="skip")
    assert frame.loc[frame["skipped"], "path"].tolist() == [f"imagenet_a/{WNIDS[6]}/3.jpg"]

    root = _domainnet(tmp_path / "dn", domains=("clipart",), per_class=(3, 3))
    listed = root / "clipart" / "zigzag" / "clipart_test_002.jpg"
    listed.unlink()
    listed.symlink_to(root / "clipart" / "zigzag" / "moved_away.jpg")
    adapter = DomainNetAdapter(expected_counts={"clipart": 18})
    with pytest.raises(DatasetError, match="clipart_test_002.jpg: dangling symlink"):
        build_manifest(adapter, root, ["clipart"], 0.0, 0.0, 0)
    frame, _ = build_manifest(adapter, root, ["clipart"], 0.0, 0.0, 0, on_bad_image="skip")
    assert frame.loc[frame["skipped"], "path"].tolist() == ["clipart/zigzag/clipart_test_002.jpg"]


def test_domainnet_split_files_in_subfolder_and_inconsistent_labels(tmp_path):
    root = _domainnet(tmp_path, domains=("quickdraw",))
    (root / "splits").mkdir()
    for split in ("train", "test"):
        (root / f"quickdraw_{split}.txt").rename(root / "splits" / f"quickdraw_{split}.txt")
    adapter = DomainNetAdapter()
    scanned = adapter.scan(root, ["quickdraw"])
    assert len(scanned) == 27
    broken = scanned.copy()
    broken.loc[broken["class_name"] == "zigzag", "official_label"] = 0
    with pytest.raises(DatasetError, match="inconsistent"):
        adapter.class_names(broken)
    swapped = scanned.copy()
    swapped["official_label"] = swapped["class_name"].map({"aircraft_carrier": 327, "t-shirt": 0, "zigzag": 344})
    with pytest.warns(UserWarning, match="label 0"):
        names = adapter.class_names(swapped)
    assert names[0] == "t-shirt" and names[327] == "aircraft_carrier"


# ----------------------------------------------------------------------------------------------------------------
# Presets: each validates against the schema on its own (used with --replace-workflow-config) and names only
# domains and classes its dataset adapter knows.

PRESETS = Path(__file__).resolve().parent.parent / "config" / "presets"
PRESET_NAMES = ["imagenet_vitb32", "imagenet_vitb16", "imagenet_16shot", "domainnet_real", "pacs_vitb32",
                "imagenet_r_subset"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_validates(name):
    from snakemake.utils import validate

    from robustft.config import SCHEMA_PATH, load_yaml_strict, validate_config
    from robustft.data.adapters import PACS_CLASSES, PACS_COUNTS
    from robustft.data.domainnet import DOMAINNET_DOMAINS
    from robustft.data.imagenet import IMAGENET_DOMAINS

    raw = load_yaml_strict(PRESETS / f"{name}.yaml")
    config = validate_config(raw)
    validate(config, str(SCHEMA_PATH))
    dataset = config["dataset"]
    known = {"imagenet": IMAGENET_DOMAINS, "domainnet": DOMAINNET_DOMAINS, "pacs": tuple(PACS_COUNTS)}[dataset["name"]]
    assert {dataset["id_domain"], *dataset["ood_domains"]} <= set(known)
    assert "zeroshot" in config["methods"] and len(config["seeds"]) == 3
    classes = {"imagenet": list(WNIDS), "domainnet": list(domainnet_classes()), "pacs": PACS_CLASSES}[dataset["name"]]
    protocols = [config["protocol"]] + [v["protocol"] for m in config["methods"].values() for v in m.values()
                                        if "protocol" in v]
    for protocol in protocols:
        assert set(protocol.get("absent_classes", [])) <= set(classes)
    from robustft.config import resolved_variant
    from robustft.methods import get_method, resolve_hyperparameters

    for method, variants in config["methods"].items():  # hyperparameter names the methods know
        for variant in variants:
            resolved = resolved_variant(config, method, variant)
            resolve_hyperparameters(get_method(method), resolved["training"], resolved["overrides"])
    if name in ("imagenet_vitb32", "imagenet_vitb16"):
        assert sorted(dataset["ood_domains"]) == sorted(IMAGENET_DOMAINS[1:])
        assert config["backbone"]["pretrained"] == "openai"
    if name == "domainnet_real":
        assert "quickdraw" not in dataset["ood_domains"]
    if name == "imagenet_r_subset":
        absent = config["protocol"]["absent_classes"]
        r_wnids = {WNIDS[i] for i in IMAGENET_R_SUBLIST}
        assert len(absent) == len(set(absent)) == 100 and set(absent) <= r_wnids


DOMAINNET_DOMAINS_USED = ("real", "painting", "clipart", "infograph", "sketch")  # domainnet_real.yaml's


@pytest.fixture(scope="module")
def miniature_roots(imagenet_root, tmp_path_factory) -> dict[str, Path]:
    """dataset name -> a miniature of its on-disk layout (PACS: the real copy the pipeline tests use)."""
    from pipeline_utils import PACS_ROOT

    domainnet = _domainnet(tmp_path_factory.mktemp("domainnet"), DOMAINNET_DOMAINS_USED, per_class=(2, 1))
    return {"imagenet": imagenet_root, "domainnet": domainnet, "pacs": PACS_ROOT}


@pytest.mark.pipeline
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_dry_run_lists_every_job(name, miniature_roots, tmp_path):
    """``snakemake -n --configfile PRESET --replace-workflow-config`` (root pointed at a miniature) plans every job.

    The dry run opens no data (the Snakefile stays cheap to parse) and writes nothing under results/.
    """
    import yaml

    from pipeline_utils import AFTER_SUMMARY_RULES, dry_run_jobs, expected_jobs, output_tail, run_snakemake

    preset = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    preset["dataset"]["root"] = str(miniature_roots[preset["dataset"]["name"]])
    configfile = tmp_path / f"{name}.yaml"
    configfile.write_text(yaml.safe_dump(preset, sort_keys=False))
    proc = run_snakemake(tmp_path, "-n", "--quiet", "rules", "--replace-workflow-config", configfile=configfile,
                         timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    jobs = dry_run_jobs(proc)
    expected = expected_jobs(preset)
    assert {rule: jobs.get(rule, 0) for rule in expected} == expected, f"dry run job counts {jobs}\n{output_tail(proc)}"
    assert set(jobs) - set(expected) <= AFTER_SUMMARY_RULES, jobs
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------------------
# dataset.expected_counts: the counts the manifest job checks a copy against


def test_manifest_stage_checks_the_configured_expected_counts(tmp_path):
    from miniature import domainnet_layout

    from robustft.io.tables import read_table
    from robustft.pipeline.stages import manifest_stage

    root = tmp_path / "dn"
    counts = domainnet_layout(root)
    args = dict(dataset="domainnet", root=str(root), domains=["real", "sketch"],
                split={"val_fraction": 0.25, "test_fraction": 0.0, "seed": 0}, on_bad_image="error", threads=1)
    with pytest.raises(DatasetError, match="domain real: found 24 images, expected 172947"):
        manifest_stage(**args, out=str(tmp_path / "published.parquet"))
    with pytest.raises(DatasetError, match="domain sketch: found 24 images, expected 25"):
        manifest_stage(**args, expected_counts={"real": 24, "sketch": 25}, out=str(tmp_path / "wrong.parquet"))
    with pytest.raises(DatasetError, match="expected_counts: key 'clipart' names no scanned domain"):
        manifest_stage(**args, expected_counts=counts, out=str(tmp_path / "foreign.parquet"))
    manifest_stage(**args, expected_counts={"real": counts["real"], "sketch": counts["sketch"]},
                   out=str(tmp_path / "exact.parquet"))
    manifest_stage(**args, expected_counts={}, out=str(tmp_path / "unchecked.parquet"))
    exact = read_table(tmp_path / "exact.parquet")
    assert len(exact) == 48 and exact.equals(read_table(tmp_path / "unchecked.parquet"))
    assert not (tmp_path / "published.parquet").exists()


def test_expected_counts_in_the_config():
    from robustft.config import ConfigError, data_key, validate_config

    base = {"dataset": {"name": "domainnet", "root": "/data/dn", "id_domain": "real", "ood_domains": ["sketch"]},
            "methods": {"zeroshot": {"default": {}}}}
    config = validate_config(base)
    assert config["dataset"]["expected_counts"] is None
    counted = validate_config({**base, "dataset": {**base["dataset"], "expected_counts": {"real": 24, "sketch/test": 8}}})
    # unset, the manifest's folder keeps its name; set, the folder is another one (another copy of the data)
    assert data_key(config["dataset"]) == data_key({k: v for k, v in config["dataset"].items() if k != "expected_counts"})
    assert data_key(counted["dataset"]) != data_key(config["dataset"])
    for bad, match in (({"real": -1}, "out of range"), ({"real/val": 3}, "expected_counts"),
                       ({"real": "many"}, "integer|type")):
        with pytest.raises(ConfigError, match=match):
            validate_config({**base, "dataset": {**base["dataset"], "expected_counts": bad}})
