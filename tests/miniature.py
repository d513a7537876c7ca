"""Miniature copies of the benchmarks' on-disk layouts (real folder and file names, a few tiny images per class).

Each generator writes its layout under ``root`` and returns the image counts it wrote, keyed as the dataset's
adapter checks them (``domain`` or ``domain/split``): pass them as ``dataset.expected_counts`` so the manifest job
checks the miniature against what was written instead of the published sizes.

- :func:`imagenet_layout`: ILSVRC train with all 1000 wnid folders (2 images each, 5 for a few "core" classes, so
  that a k-shot or class-subset protocol finds every class it needs), ILSVRC val sorted into wnid folders, and the
  five shifts under their download names: ImageNet-V2 (class-index folders), Sketch, ImageNet-R and -A (wnid folders
  of their 200-class sublists, with absent and seen classes of ``imagenet_r_subset.yaml``), ObjectNet 1.0 (PNG
  folders, one that maps to no ImageNet class and is dropped by the 113-class projection).
- :func:`domainnet_layout`: the six domain folders with official ``<domain>_{train,test}.txt`` split files and
  official labels (``painting_train.txt`` lists no ``t-shirt``, as the real one).
- :func:`pacs_layout`: ``<domain>/<class>/<image>`` for the 4 domains and 7 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: ImageNet class indices with images in every domain that holds them: in ImageNet-R's sublist at even (seen) and
#: odd (absent in imagenet_r_subset.yaml) positions, in ImageNet-A's, and behind ObjectNet's alarm clock (409, 530)
#: and banana (954).
IMAGENET_CORE = (1, 2, 4, 6, 11, 409, 954)
OBJECTNET_FOLDERS = ("alarm_clock", "banana", "squeegee")  # squeegee maps to no ImageNet class
DOMAINNET_CLASSES = ("aircraft_carrier", "t-shirt", "teddy-bear", "zigzag")
PACS_DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
SIZE = 12  # pixels per side: the tiny open_clip model resizes to 32


def _image(path: Path, label: int, k: int, fmt: str = "JPEG") -> None:
    """A SIZE x SIZE image whose colour depends on the class (so a model can learn something) plus noise."""
    rng = np.random.default_rng(label * 1009 + k)
    base = np.array([(label * 67) % 256, (label * 151) % 256, (label * 29 + 80) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def imagenet_layout(root: Path) -> dict[str, int]:
    """ImageNet + V2, Sketch, R, A, ObjectNet under ``root`` (see the module docstring); counts per domain/split."""
    from robustft.data.classlists import IMAGENET_A_SUBLIST, IMAGENET_R_SUBLIST, imagenet_wnids

    wnids = imagenet_wnids()
    counts = {"imagenet/train": 0, "imagenet/test": 0, "imagenet_v2": 0, "imagenet_sketch": 0, "imagenet_r": 0,
              "imagenet_a": 0, "objectnet": 0}

    def put(key: str, path: Path, label: int, k: int, fmt: str = "JPEG") -> None:
        _image(path, label, k, fmt)
        counts[key] += 1

    for index, wnid in enumerate(wnids):
        for k in range(5 if index in IMAGENET_CORE else 2):
            put("imagenet/train", root / "imagenet" / "train" / wnid / f"{wnid}_{k}.JPEG", index, k)
    for index in IMAGENET_CORE:
        wnid = wnids[index]
        for k in range(2):
            put("imagenet/test", root / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{index:05d}{k}.JPEG", index, 10 + k)
        put("imagenet_v2", root / "imagenetv2-matched-frequency-format-val" / str(index) / "0.jpeg", index, 20)
        put("imagenet_sketch", root / "sketch" / wnid / "sketch_1.JPEG", index, 30)
        if index in IMAGENET_R_SUBLIST:
            for k in range(2):
                put("imagenet_r", root / "imagenet-r" / wnid / f"art_{k}.jpg", index, 40 + k)
        if index in IMAGENET_A_SUBLIST:
            put("imagenet_a", root / "imagenet-a" / wnid / "0.jpg", index, 50)
    for label, folder in enumerate(OBJECTNET_FOLDERS):
        for k in range(2):
            path = root / "objectnet-1.0" / "images" / folder / f"{k}.png"
            if folder == "squeegee":
                _image(path, 1000 + label, k, "PNG")  # present on disk, not counted: dropped by the projection
            else:
                put("objectnet", path, 1000 + label, k, "PNG")
    return counts


def domainnet_layout(root: Path) -> dict[str, int]:
    """The six DomainNet domains with split files (4 train + 2 test images per class); counts per domain."""
    from robustft.data.classlists import domainnet_classes
    from robustft.data.domainnet import DOMAINNET_DOMAINS

    official = domainnet_classes()
    counts: dict[str, int] = {}
    for d, domain in enumerate(DOMAINNET_DOMAINS):
        counts[domain] = 0
        for split, n in (("train", 4), ("test", 2)):
            lines = []
            for name in DOMAINNET_CLASSES:
                if domain == "painting" and split == "train" and name == "t-shirt":
                    continue  # as the real painting_train.txt
                label = official.index(name)
                for k in range(n):
                    rel = f"{domain}/{name}/{domain}_{label:03d}_{split}{k:02d}.jpg"
                    _image(root / rel, label, d * 10 + k)
                    lines.append(f"{rel} {label}")
                    counts[domain] += 1
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return counts


def pacs_layout(root: Path, per_class: int = 4) -> dict[str, int]:
    """PACS's 4 domains x 7 classes, ``per_class`` images each; counts per domain."""
    for d, domain in enumerate(PACS_DOMAINS):
        for label, name in enumerate(PACS_CLASSES):
            for k in range(per_class):
                _image(root / domain / name / f"pic_{k:03d}.jpg", label, d * 10 + k)
    return {domain: per_class * len(PACS_CLASSES) for domain in PACS_DOMAINS}


#: dataset.name -> the generator of its miniature layout.
LAYOUTS = {"imagenet": imagenet_layout, "domainnet": domainnet_layout, "pacs": pacs_layout}
