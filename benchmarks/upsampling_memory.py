"""Peak resident memory (VmHWM) of upsampling N CIFAR images to S px: (a) materialised up front as one float32
numpy array (N x S x S x 3 x 4 bytes), against (b) what the project does: cifar100.batches.TrainBatches over the
uint8 32x32 images, each batch upsampled by keras.layers.Resizing(S, S) (as inside the model) and dropped. One
process per case; both import Keras and hold the uint8 images and the same batches: one baseline column.

    .venv/bin/python benchmarks/upsampling_memory.py [--images 10000] [--sizes 96 160] [--quick: 2,000 at 96 px]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["N", "S", "materialised GiB (computed)", "baseline MiB (Keras + uint8 images)",
           "peak MiB, materialised float32", "peak MiB, Resizing batch by batch"]


def peak_mib(field: str = "VmHWM") -> float:  # VmRSS: now
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


def measure(approach: str, images: int, size: int, batch_size: int) -> dict:
    import numpy as np

    from cifar100.batches import TrainBatches, keras  # the Keras that cifar100 sets up

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), np.arange(images) % 100
    batches, resize = TrainBatches(x, y, 100, batch_size), keras.layers.Resizing(size, size)
    resize(np.zeros((1, 32, 32, 3), np.float32))  # built before the baseline
    baseline = peak_mib("VmRSS")
    kept = np.empty((images, size, size, 3), np.float32) if approach == "materialised" else None  # fit(kept, ...)
    for index in range(len(batches)):  # as fit reads them; (b) keeps nothing of a batch once it is upsampled
        upsampled = np.asarray(resize(batches[index][0].astype(np.float32)))
        if kept is not None:
            kept[index * batch_size:index * batch_size + len(upsampled)] = upsampled
    return {"baseline": baseline, "peak": peak_mib()}


def child(approach: str, images: int, size: int, batch_size: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps([approach, images, size, batch_size])],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)})
    if result.returncode:
        raise SystemExit(f"{approach} {images}x{size}px failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2,000 images at 96 px")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return print(json.dumps(measure(*json.loads(args.child)))) or 0
    args.images, args.sizes = (2000, [96]) if args.quick else (args.images, args.sizes)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    print(f"# Peak RSS of upsampling {args.images:,} images (batch {args.batch_size}; {available:.0f} GiB free)\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for size in args.sizes:
        gib = args.images * size * size * 3 * 4 / 2**30
        streamed = child("streamed", args.images, size, args.batch_size)
        held = child("materialised", args.images, size, args.batch_size) if gib < 0.8 * available else None
        cells = [args.images, size, f"{gib:.3f}", f"{streamed['baseline']:.0f}",
                 f"{held['peak']:.0f}" if held else f"not run: {gib:.1f} GiB > 80% of free memory",
                 f"{streamed['peak']:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
