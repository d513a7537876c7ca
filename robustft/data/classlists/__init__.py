"""Class lists and label mappings of the benchmark datasets (small data files, loaded once).

Sources, each checked when copied:

- ``imagenet_wnids.json``: the 1000 ILSVRC-2012 WordNet ids, sorted; the position of a wnid is its ImageNet label
  (torchvision ``ImageFolder`` order). Same list as timm's ``imagenet_synsets.txt``.
- ``imagenet_openai_classnames.json``: the readable class names of the CLIP zero-shot notebook, in wnid order, as in
  ``mlfoundations/wise-ft`` ``src/datasets/imagenet_classnames.py`` (``openai_classnames``) and open_clip's
  ``IMAGENET_CLASSNAMES``. Two names repeat ("missile", "sunglasses"), as in the original.
- ``IMAGENET_R_SUBLIST`` / ``IMAGENET_A_SUBLIST`` below: wise-ft ``src/datasets/imagenet_r.py`` and
  ``imagenet_a.py`` ``CLASS_SUBLIST`` (identical to timm's ``imagenet_{r,a}_indices.txt``). Both are sorted, so
  the sorted wnid folders of ImageNet-R/-A enumerate the sublist in order (a folder's ``ImageFolder`` label is the
  position of its ImageNet index in the sublist).
- ``objectnet_to_imagenet.json``: the 113 ObjectNet folders that map to ImageNet, sorted by folder name (the
  ``ImageFolder`` label order of wise-ft ``src/datasets/objectnet.py``), each with its ObjectNet name, the
  ImageNet class names of wise-ft ``objectnet_metadata/objectnet_to_imagenet_1k.json`` (split on ``"; "``) and
  their wnids and ImageNet indices (125 distinct ImageNet classes in all).
- ``domainnet_classes.json``: the 345 DomainNet classes (folder names) in the label order of the official split
  files, as in thuml Transfer-Learning-Library ``tllib/vision/datasets/domainnet.py`` (``t-shirt`` = 327, as
  Dassl notes). The split files themselves stay the authority (see ``robustft.data.domainnet``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: ImageNet indices of the 200 ImageNet-R classes (wise-ft ``imagenet_r.py`` CLASS_SUBLIST, copied exactly).
IMAGENET_R_SUBLIST: tuple[int, ...] = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107,
    113, 122,
    125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195, 199, 203,
    207, 208, 219,
    231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289,
    291, 292, 293,
    296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347,
    353, 355, 361,
    362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447,
    448, 457, 462,
    463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613,
    617, 621, 629,
    637, 657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852,
    866, 875, 883,
    889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965,
    967, 980, 981,
    983, 988,
)

#: ImageNet indices of the 200 ImageNet-A classes (wise-ft ``imagenet_a.py`` CLASS_SUBLIST, copied exactly).
IMAGENET_A_SUBLIST: tuple[int, ...] = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107,
    108, 110,
    113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307,
    308, 309,
    310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397,
    400, 401,
    402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488,
    492, 496,
    514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614,
    626, 627,
    640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773,
    774, 776,
    779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870,
    879, 880,
    888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984,
    986, 987, 988,
)


def _load(name: str):
    with open(_HERE / name, encoding="utf-8") as handle:
        return json.load(handle)


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet wnids in label order (sorted)."""
    return tuple(_load("imagenet_wnids.json"))


@lru_cache(maxsize=None)
def imagenet_openai_classnames() -> tuple[str, ...]:
    """CLIP's readable ImageNet class names, in label order."""
    return tuple(_load("imagenet_openai_classnames.json"))


@lru_cache(maxsize=None)
def objectnet_mapping() -> tuple[dict, ...]:
    """The 113 mapped ObjectNet classes in label order: ``folder``, ``name``, ``imagenet_names``,
    ``imagenet_wnids``, ``imagenet_indices``."""
    return tuple(_load("objectnet_to_imagenet.json"))


@lru_cache(maxsize=None)
def domainnet_classes() -> tuple[str, ...]:
    """The 345 DomainNet class folders in the official label order."""
    return tuple(_load("domainnet_classes.json"))
