"""Dataset manifests: folder scans, seeded stratified splits, nested caps, hashes, bad inputs, the PACS adapter."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import robustft.data.build as build_module
from robustft.data.adapters import PACS_CLASSES, PACS_COUNTS, DatasetAdapter, PacsAdapter
from robustft.data.build import build_manifest, verify_manifest_files
from robustft.data.images import check_image, decode_for_cache
from robustft.data.manifest import (
    MANIFEST_COLUMNS,
    DatasetError,
    assign_splits,
    manifest_hash,
    scan_domain_folders,
    select_rows,
)
from robustft.data.registry import get_adapter

DOMAINS = ["alpha", "beta"]
CLASSES = ["cat", "ant", "bee"]  # deliberately unsorted: labels follow sorted class names
PACS_ROOT = Path("/work/shared/data/PACS")


def _save_image(path: Path, seed: int, mode: str = "RGB", fmt: str = "JPEG", size: tuple[int, int] = (12, 10)) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


def make_layout(root: Path, domains=DOMAINS, classes=CLASSES, per_class: int = 10) -> Path:
    """``root/<domain>/<class>/img_XX.jpg`` with small random images."""
    seed = 0
    for domain in domains:
        for class_name in classes:
            for i in range(per_class):
                _save_image(root / domain / class_name / f"img_{i:02d}.jpg", seed)
                seed += 1
    return root


def build(root: Path, seed: int = 0, val: float = 0.2, test: float = 0.3, adapter=None, **kwargs):
    return build_manifest(adapter or DatasetAdapter(), root, DOMAINS, val, test, seed, threads=1, **kwargs)


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path / "data")


# --- scanning, labels, splits ----------------------------------------------------------------------------------------


def test_manifest_columns_and_labels(layout):
    frame, meta = build(layout)
    assert list(frame.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert {"skipped", "skip_reason"} <= set(frame.columns)
    assert len(frame) == 2 * 3 * 10
    assert frame["row_id"].tolist() == list(range(len(frame)))
    assert not frame["skipped"].any()
    # labels index the sorted class names
    assert meta["class_names"] == ["ant", "bee", "cat"]
    for name, label in zip(frame["class_name"], frame["label"]):
        assert meta["class_names"][label] == name
    # paths are relative to the root and point at the files
    for path, size in zip(frame["path"], frame["bytes"]):
        assert not os.path.isabs(path)
        assert (layout / path).stat().st_size == size
    assert meta["domains"] == DOMAINS and meta["dataset"] == "imagefolder"
    assert meta["split"] == {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0}
    assert meta["manifest_hash"] == manifest_hash(frame)


def test_stratified_split_counts_per_domain_and_class(layout):
    frame, _ = build(layout, val=0.2, test=0.3)
    counts = frame.groupby(["domain", "class_name", "split"]).size()
    for domain in DOMAINS:
        for class_name in CLASSES:
            assert counts[(domain, class_name, "test")] == 3
            assert counts[(domain, class_name, "val")] == 2
            assert counts[(domain, class_name, "train")] == 5
    # ranks are 0..n-1 within each (domain, class, split)
    for _, group in frame.groupby(["domain", "class_name", "split"]):
        assert sorted(group["rank"]) == list(range(len(group)))


def test_split_is_reproducible_and_seeded(layout):
    first, meta_first = build(layout, seed=3)
    again, meta_again = build(layout, seed=3)
    pd.testing.assert_frame_equal(first, again)
    assert meta_first["manifest_hash"] == meta_again["manifest_hash"]

    other, meta_other = build(layout, seed=4)
    key = ["path"]
    merged = first[key + ["split", "rank"]].merge(other[key + ["split", "rank"]], on=key, suffixes=("_a", "_b"))
    assert (merged["split_a"] != merged["split_b"]).any()
    assert meta_other["manifest_hash"] != meta_first["manifest_hash"]
    # the split sizes do not depend on the seed
    assert first.groupby("split").size().equals(other.groupby("split").size())


def test_adding_a_domain_does_not_reshuffle_another(layout):
    frame, _ = build(layout, seed=1)
    make_layout(layout, domains=["gamma"])
    bigger, _ = build_manifest(DatasetAdapter(), layout, DOMAINS + ["gamma"], 0.2, 0.3, 1, threads=1)
    cols = ["path", "split", "rank"]
    old = frame[cols].sort_values("path").reset_index(drop=True)
    new = bigger[bigger["domain"].isin(DOMAINS)][cols].sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(old, new)


def test_caps_give_nested_subsets(layout):
    frame, _ = build(layout, val=0.1, test=0.1)  # 8 train per class
    previous: set[str] | None = None
    for cap in (8, 5, 3, 1):
        rows = select_rows(frame, "alpha", "train", max_per_class=cap)
        assert rows.groupby("class_name").size().tolist() == [cap] * 3
        current = set(rows["path"])
        if previous is not None:
            assert current < previous
        previous = current
    assert len(select_rows(frame, "alpha", "train", max_per_class=None)) == 24
    assert len(select_rows(frame, "alpha", "train", max_per_class=100)) == 24
    restricted = select_rows(frame, "alpha", "train", classes=[0, 2])
    assert set(restricted["label"]) == {0, 2}


def test_assign_splits_refuses_bad_fractions():
    frame = pd.DataFrame({"path": ["a", "b", "c"], "domain": ["d"] * 3, "class_name": ["c"] * 3})
    with pytest.raises(ValueError, match="sum below 1"):
        assign_splits(frame, 0.5, 0.5, 0)


def test_manifest_hash_stable_and_sensitive(layout):
    frame, _ = build(layout)
    digest = manifest_hash(frame)
    assert digest == manifest_hash(frame.copy())
    assert len(digest) == 16
    # changing which image has which label / split / rank changes the hash
    relabelled = frame.copy()
    relabelled.loc[0, "label"] = (relabelled.loc[0, "label"] + 1) % 3
    assert manifest_hash(relabelled) != digest
    moved = frame.copy()
    moved.loc[0, "split"] = "val" if moved.loc[0, "split"] != "val" else "train"
    assert manifest_hash(moved) != digest
    renamed = frame.copy()
    renamed.loc[0, "path"] = renamed.loc[0, "path"] + "x"
    assert manifest_hash(renamed) != digest
    # a removed image changes the hash of a rebuilt manifest
    (layout / frame.loc[0, "path"]).unlink()
    rebuilt, _ = build(layout)
    assert manifest_hash(rebuilt) != digest


def test_hidden_files_and_folders_are_ignored(layout):
    (layout / "alpha" / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    _save_image(layout / "alpha" / "cat" / ".ipynb_checkpoints" / "img_00-checkpoint.jpg", 99)
    (layout / ".hidden_domain").mkdir()
    scanned = scan_domain_folders(layout)
    assert sorted(scanned["domain"].unique()) == DOMAINS
    assert not scanned["path"].str.contains(r"(?:^|/)\.").any()
    frame, _ = build(layout)
    assert len(frame) == 60 and not frame["skipped"].any()


# --- bad layouts -----------------------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="dataset root not found") as info:
        build(missing)
    assert str(missing) in str(info.value)


def test_missing_domain_folder(layout):
    with pytest.raises(DatasetError, match="not found") as info:
        build_manifest(DatasetAdapter(), layout, ["alpha", "gamma"], 0.2, 0.3, 0, threads=1)
    assert str(layout / "gamma") in str(info.value)


def test_empty_domain_folder(layout):
    (layout / "gamma").mkdir()
    with pytest.raises(DatasetError, match="empty") as info:
        build_manifest(DatasetAdapter(), layout, ["alpha", "gamma"], 0.2, 0.3, 0, threads=1)
    assert str(layout / "gamma") in str(info.value)


def test_empty_class_folder(layout):
    for file in (layout / "beta" / "bee").iterdir():
        file.unlink()
    with pytest.raises(DatasetError, match="empty") as info:
        build(layout)
    assert str(layout / "beta" / "bee") in str(info.value)


def test_classes_differ_between_domains(layout):
    _save_image(layout / "beta" / "dog" / "img_00.jpg", 1)
    with pytest.raises(DatasetError, match="classes differ between domains") as info:
        build(layout)
    message = str(info.value)
    assert str(layout / "beta") in message and "dog" in message


# --- bad images ------------------------------------------------------------------------------------------------------


def _truncated_jpeg(path: Path) -> None:
    _save_image(path, 7, size=(64, 48))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "truncated": ("alpha/ant/img_03.jpg", _truncated_jpeg),
    "random_bytes": ("beta/cat/img_05.jpg", lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000))),
    "not_an_image": ("alpha/bee/notes.txt", lambda p: p.write_text("some notes, not an image\n")),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_stops_the_build_naming_it(layout, kind):
    relative, make = BAD_FILES[kind]
    make(layout / relative)
    assert check_image(layout / relative) is not None
    with pytest.raises(DatasetError) as info:
        build(layout)
    message = str(info.value)
    assert str(layout / relative) in message
    assert "on_bad_image: skip" in message
    assert "\n" not in message


def test_bad_files_are_recorded_and_skipped(layout):
    for relative, make in BAD_FILES.values():
        make(layout / relative)
    frame, meta = build(layout, on_bad_image="skip")
    skipped = frame[frame["skipped"]]
    assert sorted(skipped["path"]) == sorted(relative for relative, _ in BAD_FILES.values())
    assert set(skipped["split"]) == {"skipped"}
    assert (skipped["rank"] == -1).all()
    assert all(str(layout / p) in reason for p, reason in zip(skipped["path"], skipped["skip_reason"]))
    assert (frame.loc[~frame["skipped"], "skip_reason"] == "").all()
    assert sorted(meta["skipped"]) == sorted(skipped["path"])
    # skipped files take no split slot and never come out of select_rows
    good = frame[~frame["skipped"]]
    assert len(good) == 60 - 2  # two of the bad files replaced good images; notes.txt was an extra file
    for domain in DOMAINS:
        for split in ("train", "val", "test"):
            assert not select_rows(frame, domain, split)["skipped"].any()
    truncated_class = good[(good["domain"] == "alpha") & (good["class_name"] == "ant")]
    assert len(truncated_class) == 9
    assert truncated_class.groupby("split").size().to_dict() == {"test": 3, "train": 4, "val": 2}


def test_class_with_only_bad_images_is_refused_even_when_skipping(layout):
    for file in (layout / "beta" / "ant").iterdir():
        file.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="no readable image") as info:
        build(layout, on_bad_image="skip")
    assert str(layout / "beta" / "ant") in str(info.value)


@pytest.mark.parametrize(("mode", "fmt", "suffix"), [("L", "JPEG", ".jpg"), ("CMYK", "JPEG", ".jpg"),
                                                      ("P", "PNG", ".png"), ("RGBA", "PNG", ".png"),
                                                      ("LA", "PNG", ".png")])
def test_non_rgb_images_are_converted_not_rejected(layout, mode, fmt, suffix):
    path = layout / "alpha" / "cat" / f"odd_{mode}{suffix}"
    _save_image(path, 5, mode=mode, fmt=fmt, size=(20, 16))
    with Image.open(path) as raw:
        assert raw.mode == mode
    assert check_image(path) is None
    pixels = decode_for_cache(path, 8, "bilinear")
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    frame, _ = build(layout)
    assert not frame["skipped"].any()
    assert str(path.relative_to(layout)) in set(frame["path"])


def test_verify_manifest_files_detects_deleted_and_changed_files(layout):
    frame, _ = build(layout)
    verify_manifest_files(frame, layout)  # unchanged: fine

    changed = layout / frame.loc[3, "path"]
    _save_image(changed, 1234, size=(40, 30))
    with pytest.raises(DatasetError, match="changed size") as info:
        verify_manifest_files(frame, layout)
    assert str(changed) in str(info.value)

    frame, _ = build(layout)
    deleted = layout / frame.loc[7, "path"]
    deleted.unlink()
    with pytest.raises(DatasetError, match="missing") as info:
        verify_manifest_files(frame, layout)
    assert str(deleted) in str(info.value)


def test_verify_manifest_files_ignores_skipped_rows_only(layout):
    bad = layout / "alpha" / "ant" / "img_00.jpg"
    _truncated_jpeg(bad)
    frame, _ = build(layout, on_bad_image="skip")
    assert frame.loc[frame["path"] == "alpha/ant/img_00.jpg", "skipped"].tolist() == [True]
    bad.unlink()
    verify_manifest_files(frame, layout)  # the skipped file is gone: nothing reads it, fine
    good = layout / frame.loc[~frame["skipped"], "path"].iloc[0]
    good.unlink()
    with pytest.raises(DatasetError, match="missing") as info:  # a usable file gone is still refused
        verify_manifest_files(frame, layout)
    assert str(good) in str(info.value)


# --- files the scan lists but cannot read; draft-mode checks; threads and progress -----------------------------------


def test_a_dangling_symlink_stops_the_build_naming_it(layout):
    link = layout / "beta" / "bee" / "img_99.jpg"
    link.symlink_to(layout / "nowhere" / "gone.jpg")
    scanned = scan_domain_folders(layout)
    assert scanned.loc[scanned["path"] == "beta/bee/img_99.jpg", "bytes"].tolist() == [-1]
    with pytest.raises(DatasetError) as info:
        build(layout)
    message = str(info.value)
    assert f"unreadable file {link}: dangling symlink to {layout / 'nowhere' / 'gone.jpg'}" in message
    assert "on_bad_image: skip" in message and "\n" not in message


def test_a_dangling_symlink_is_recorded_and_skipped(layout):
    (layout / "beta" / "bee" / "img_99.jpg").symlink_to("missing_target.jpg")
    (layout / "alpha" / "cat" / "img_00.jpg").unlink()
    (layout / "alpha" / "cat" / "img_00.jpg").symlink_to("img_01.jpg")  # a working symlink is an ordinary image
    frame, meta = build(layout, on_bad_image="skip")
    skipped = frame[frame["skipped"]]
    assert skipped["path"].tolist() == ["beta/bee/img_99.jpg"] == meta["skipped"]
    assert "dangling symlink to missing_target.jpg" in skipped["skip_reason"].iloc[0]
    assert skipped["bytes"].tolist() == [-1] and skipped["split"].tolist() == ["skipped"]
    assert len(frame[~frame["skipped"]]) == 60
    linked = frame[frame["path"] == "alpha/cat/img_00.jpg"]
    assert not linked["skipped"].any() and linked["bytes"].tolist() == [(layout / "alpha/cat/img_01.jpg").stat().st_size]


class VanishingAdapter(DatasetAdapter):
    """Deletes some files right after the scan listed them (another process cleaning up, a network share)."""

    def __init__(self, vanish: list[str]) -> None:
        super().__init__()
        self.vanish = vanish

    def scan(self, root, domains):
        scanned = super().scan(root, domains)
        for relative in self.vanish:
            (Path(root) / relative).unlink()
        return scanned


def test_a_file_that_vanishes_after_the_scan_is_an_error_or_a_recorded_skip(layout):
    with pytest.raises(DatasetError) as info:
        build(layout, adapter=VanishingAdapter(["alpha/bee/img_04.jpg"]))
    assert f"unreadable file {layout / 'alpha/bee/img_04.jpg'}: it vanished after the folder scan" in str(info.value)
    _save_image(layout / "alpha/bee/img_04.jpg", 4)
    frame, _ = build(layout, adapter=VanishingAdapter(["alpha/bee/img_04.jpg"]), on_bad_image="skip")
    skipped = frame[frame["skipped"]]
    assert skipped["path"].tolist() == ["alpha/bee/img_04.jpg"]
    assert "vanished after the folder scan" in skipped["skip_reason"].iloc[0]


@pytest.mark.parametrize("progressive", [False, True])
def test_the_draft_mode_check_catches_every_truncation(tmp_path, progressive):
    """JPEGs are checked at 1/8 scale; cutting the file anywhere still fails, as a full decode does."""
    path = tmp_path / "full.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path, "JPEG", progressive=progressive)
    data = path.read_bytes()
    assert check_image(path) is None
    with Image.open(path) as image:
        image.draft(None, (1, 1))
        image.load()
        assert image.size == (16, 12)  # the check really decodes at 1/8 scale
    cut = tmp_path / "cut.jpg"
    for length in list(range(1, len(data), 97)) + [len(data) - 2, len(data) - 1]:
        cut.write_bytes(data[:length])
        reason = check_image(cut)
        assert reason is not None and str(cut) in reason, length


def test_checking_uses_the_threads_and_logs_progress(layout, monkeypatch, caplog):
    monkeypatch.setenv("ROBUSTFT_PROGRESS_INTERVAL", "0")
    seen_threads: set[str] = set()
    original = build_module.check_image

    def recording(path):
        seen_threads.add(threading.current_thread().name)
        time.sleep(0.002)  # long enough that every thread of the pool gets work
        return original(path)

    monkeypatch.setattr(build_module, "check_image", recording)
    monkeypatch.setattr(build_module, "VERIFY_BATCH", 16)
    with caplog.at_level(logging.INFO, logger="robustft"):
        frame, meta = build_manifest(DatasetAdapter(), layout, DOMAINS, 0.2, 0.3, 0, threads=3)
    assert len(seen_threads) > 1
    single, single_meta = build(layout)
    pd.testing.assert_frame_equal(frame, single)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("progress verify imagefolder: 16/60 images") for line in lines)
    assert any(line.startswith("done verify imagefolder: 60 images") for line in lines)


def test_in_error_mode_checking_stops_at_the_batch_of_the_first_bad_file(layout, monkeypatch):
    _truncated_jpeg(layout / "alpha" / "ant" / "img_01.jpg")  # sorted first domain and class: the first batch
    checked: list[Path] = []
    original = build_module.check_image
    monkeypatch.setattr(build_module, "check_image", lambda path: checked.append(path) or original(path))
    monkeypatch.setattr(build_module, "VERIFY_BATCH", 8)
    with pytest.raises(DatasetError, match="alpha/ant/img_01.jpg"):
        build(layout)
    assert len(checked) == 8


# --- adapters --------------------------------------------------------------------------------------------------------


def test_get_adapter():
    assert isinstance(get_adapter("pacs"), PacsAdapter)
    assert type(get_adapter("imagefolder")) is DatasetAdapter
    with pytest.raises(ValueError, match="unknown dataset 'pacs2'"):
        get_adapter("pacs2")


def test_pacs_adapter_refuses_an_incomplete_copy(tmp_path):
    root = make_layout(tmp_path / "PACS", domains=["photo", "sketch"], classes=PACS_CLASSES, per_class=2)
    adapter = PacsAdapter()
    with pytest.raises(DatasetError) as info:
        build_manifest(adapter, root, ["photo", "sketch"], 0.2, 0.3, 0, threads=1)
    message = str(info.value)
    assert "pacs" in message and "photo" in message
    assert "found 14 images" in message and f"expected {PACS_COUNTS['photo']}" in message


def test_pacs_adapter_counts_with_patched_expected_counts(tmp_path):
    root = make_layout(tmp_path / "PACS", domains=["photo", "sketch"], classes=PACS_CLASSES, per_class=2)
    (root / "sketch" / "dog" / "img_00.jpg").unlink()
    adapter = PacsAdapter(expected_counts={"photo": 14, "sketch": 14})
    with pytest.raises(DatasetError, match="domain sketch: found 13 images, expected 14"):
        adapter.check_counts(adapter.scan(root, ["photo", "sketch"]))
    _save_image(root / "sketch" / "dog" / "img_00.jpg", 3)
    frame, meta = build_manifest(adapter, root, ["photo", "sketch"], 0.2, 0.3, 0, threads=1)
    assert meta["class_names"] == PACS_CLASSES and meta["dataset"] == "pacs"
    assert len(frame) == 28


@pytest.mark.skipif(not PACS_ROOT.is_dir(), reason="PACS not available")
def test_real_pacs_copy_is_complete():
    adapter = PacsAdapter()
    scanned = adapter.scan(PACS_ROOT, list(PACS_COUNTS))
    adapter.check_counts(scanned)
    assert len(scanned) == sum(PACS_COUNTS.values()) == 9991
    assert sorted(scanned["class_name"].unique()) == PACS_CLASSES
