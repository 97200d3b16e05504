"""Peak memory and speed of one training epoch of the data path, at several upsampled image sizes.

The data path is what the project runs for every batch: the sampler's uint8 32x32 batches, augmentation,
upsampling with a Resizing layer inside the model, and (instead of a backbone) a trivial head: global
average pooling and a 100-way softmax. Each size runs in its own process, so each peak resident memory
(ru_maxrss) is that size's own. Beside it: the memory that materialising the upsampled float32 arrays
would need, computed as images x size x size x 3 x 4 bytes.

    python benchmarks/upsampling_memory.py            # 50,000 images at 32, 96, 224, 299 px
    python benchmarks/upsampling_memory.py --quick    # 5,000 images at 32, 96, 224 px (under 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, run_isolated, table  # noqa: E402

COLUMNS = ["image size (px)", "images", "epoch seconds", "images/s", "RSS before the epoch (GB)", "peak RSS (GB)",
           "materialised float32 (GiB, computed)", "materialised / peak"]


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def measure(size: int, images: int, batch_size: int) -> dict:
    import keras
    import numpy as np

    from cifar100 import models, write_data
    from cifar100.batches import TrainBatches
    from cifar100.config import Config

    labels = np.arange(images) % 100
    x = write_data.synthetic_images(labels, 100, seed=0)
    trivial = keras.Sequential([keras.Input((size, size, 3)), keras.layers.GlobalAveragePooling2D()])
    model = models.build_model(Config(backbone="tinycnn", image_size=size, weights=None, augment="basic"), 100,
                               backbone=trivial)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    sampler = TrainBatches(x, labels, 100, batch_size, seed=0)
    before = resident_bytes()
    started = time.perf_counter()
    model.fit(sampler, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    materialised = images * size * size * 3 * 4
    return {"image size (px)": size, "images": images, "epoch seconds": seconds, "images/s": images / seconds,
            "RSS before the epoch (GB)": before / 1e9, "peak RSS (GB)": peak_bytes / 1e9,
            "materialised float32 (GiB, computed)": materialised / 2**30,
            "materialised / peak": materialised / peak_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 images at 32, 96, 224 px")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.sizes[0], args.images, args.batch_size)))
        return 0
    sizes = args.sizes or ([32, 96, 224] if args.quick else [32, 96, 224, 299])
    images = args.images or (5000 if args.quick else 50000)
    rows = [run_isolated(__file__, ["--sizes", str(s), "--images", str(images), "--batch-size", str(args.batch_size)])
            for s in sizes]
    print(f"# Data path memory and speed, one epoch (machine: {machine()}; batch {args.batch_size})\n")
    print(table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
