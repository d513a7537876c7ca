"""Reading the array caches: the chunk layout before (1 MiB chunks) and after (``array_writer``: 32 KiB, one image per
chunk), sequential and in the trainer's random order, from the page cache ("warm") and from the disk ("cold").

Synthetic caches of random uint8 images (and one of 512-float features) are written once per layout. Reads:

* sequential: batches of 256 rows front to back (feature extraction, evaluation);
* random: an epoch's seeded permutation read as the trainer reads it (``robustft.io.arrays.take_rows`` on blocks of
  ``READ_BLOCK_BYTES`` of rows, at most 1 % of the cache: sorted within the block, one slice per run of consecutive
  rows, put back in order);
* random, h5py list index: the same blocks through h5py's own ``dataset[sorted_rows]`` (the way not taken).

"cold" evicts the file from the page cache first (``posix_fadvise(DONTNEED)``, no root needed), so the disk is read.
Amplification: bytes HDF5 reads per row read at random (a whole chunk) over the row's bytes.

Example: ``python bench/bench_reads.py --mb 200``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import add_common_args, evict_page_cache, print_machine, table, wait_for_quiet, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200.0, help="size of each synthetic cache in MB")
    p.add_argument("--sizes", default="96,224", help="image sizes in px (comma-separated)")
    p.add_argument("--feature-dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write the caches (default: a temporary folder)")
    add_common_args(p)
    return p.parse_args(argv)


def write_cache(path: Path, shape: tuple[int, ...], dtype, n: int, layout: str) -> None:
    import h5py
    import numpy as np

    from robustft.io.arrays import array_writer

    rng = np.random.default_rng(0)
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    batch = max(1, (8 << 20) // row_bytes)
    block = (rng.integers(0, 256, (batch, *shape), dtype=np.uint8) if dtype == np.uint8
             else rng.standard_normal((batch, *shape), dtype=np.float32))
    if layout == "after":
        context = array_writer(path, n, {"x": (shape, dtype)}, {})
    else:  # the layout before this change: as many rows as fit in 1 MiB per chunk
        handle = h5py.File(path, "w")
        handle.create_dataset("x", (n, *shape), dtype, chunks=(max(1, min(n, (1 << 20) // row_bytes)), *shape))
        context = handle
    with context as out:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            out["x"][start:stop] = np.roll(block, start // batch, axis=0)[: stop - start]


def measure(path: Path, n: int, row_bytes: int, cold: bool, repeats: int) -> dict[str, float]:
    import h5py
    import numpy as np

    from robustft.io.arrays import take_rows
    from robustft.training.data import READ_BLOCK_BYTES

    # the trainer's block, or 1 % of the rows where the cache is small: on ImageNet a block holds about 1e-4 of
    # the rows, so nearly every row read at random is alone in its part of the file
    block = max(1, min(READ_BLOCK_BYTES // row_bytes, n // 100))
    order = np.random.default_rng(1).permutation(n)
    ways = {
        "sequential": lambda d: [d[s : s + 256] for s in range(0, n, 256)],
        "random": lambda d: [take_rows(d, order[s : s + block]) for s in range(0, n, block)],
        # (so slow that a tenth of the epoch is read; the rate is per byte read)
        "random, h5py list index": lambda d: [d[np.sort(order[s : s + block])] for s in range(0, n // 10, block)],
    }
    out = {}
    for name, read in ways.items():
        times = []
        for _ in range(repeats):
            if cold:
                evict_page_cache(path)
            with h5py.File(path, "r") as handle:
                start = time.perf_counter()
                read(handle["x"])
                times.append(time.perf_counter() - start)
        done = (n // 10 if name.endswith("list index") else n) * row_bytes
        out[name] = done / statistics.median(times) / 1e6
    with h5py.File(path, "r") as handle:
        out["rows per chunk"] = handle["x"].chunks[0]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy as np

    tmp_ctx = tempfile.TemporaryDirectory(prefix="robustft-bench-reads-", dir=args.dir)
    tmp = Path(tmp_ctx.name)
    caches = [(f"{s} px images", (s, s, 3), np.uint8) for s in map(int, args.sizes.split(","))]
    caches.append((f"{args.feature_dim}-float features", (args.feature_dim,), np.float32))
    wait_for_quiet(args.quiet_load, args.wait_quiet)
    print_machine(f"caches of {args.mb:.0f} MB in {tmp}")
    rows, figures = [], {}
    for label, shape, dtype in caches:
        row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        n = max(1, int(args.mb * 1e6) // row_bytes)
        for layout in ("before", "after"):
            path = tmp / f"{layout}.h5"
            write_cache(path, shape, dtype, n, layout)
            for cold in (False, True):
                got = measure(path, n, row_bytes, cold, args.repeats)
                name = f"{label}, {'1 MiB chunks (before)' if layout == 'before' else 'array_writer (after)'}"
                rows.append({"cache": name, "page cache": "cold" if cold else "warm",
                             "rows/chunk": got["rows per chunk"],
                             "amplification": f"{got['rows per chunk']}x",
                             "sequential MB/s": got["sequential"], "random MB/s": got["random"],
                             "random rows/s": got["random"] * 1e6 / row_bytes,
                             "random, h5py list index MB/s": got["random, h5py list index"]})
                figures[f"{name} {'cold' if cold else 'warm'}"] = got
                print(f"# {name}, {'cold' if cold else 'warm'} done", flush=True)
            path.unlink()
    text = table(rows, ["cache", "page cache", "rows/chunk", "amplification", "sequential MB/s", "random MB/s",
                        "random rows/s", "random, h5py list index MB/s"],
                 title=f"Cache reads, {args.mb:.0f} MB per cache, median of {args.repeats}")
    write_json(args.json, {"rows": rows, "figures": figures, "tables": [text]})
    tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
