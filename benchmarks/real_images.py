"""Accuracy on real photographs: the `cpu-small` preset (and each --variant of it) trained by the command line, in
a process of its own, on the CIFAR-10 dev subset (../shared/data/cifar10-dev: 8,000 training and 2,000 held-out
real images, NOT CIFAR-100) from the offline ImageNet weights in ../shared/weights; validation and test top-1
from the run's results.json, and the wall time of the whole command. Each call trains into new run folders.

    .venv/bin/python benchmarks/real_images.py --variant "" --variant "image_size=96" --variant "augment=none"
    .venv/bin/python benchmarks/real_images.py --quick    # 1 + 1 epochs at 32 px on 500 images (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUILDER = SHARED / "data" / "cifar10-dev" / "build.py"
WEIGHTS = SHARED / "weights" / "mobilenet_v3_small_1.0_imagenet_notop.weights.h5"
QUICK = ["head_epochs=1", "finetune_epochs=1", "image_size=32", "max_train_images=500"]
COLUMNS = ["variant", "val top-1", "test top-1", "wall s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", help='settings "k=v k=v" over cpu-small ("": the preset)')
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "cifar10-dev")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "data")
    parser.add_argument("--quick", action="store_true", help="adds " + " ".join(QUICK))
    args = parser.parse_args(argv)
    if not (args.data / "batches.meta").exists():
        subprocess.run([sys.executable, str(BUILDER), str(args.data)], check=True, stdout=subprocess.DEVNULL)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="real-images-", dir=args.runs_dir))
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    rows = []  # the variant's settings come last: they override the weights and --quick's
    for index, variant in enumerate(args.variant or [""]):
        settings, run_dir = [f"weights={WEIGHTS}"] + (QUICK if args.quick else []) + variant.split(), runs / str(index)
        command = [sys.executable, "-m", "cifar100", "train", "--preset", "cpu-small", "--data", str(args.data),
                   "--run-dir", str(run_dir)] + [part for s in settings for part in ("--set", s)]
        started, done = time.perf_counter(), subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"variant {variant!r} failed ({done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
        results = json.loads((run_dir / "results.json").read_text())
        rows.append([variant or "cpu-small as is", f"{results['validation']['top1']:.4f}",
                     f"{results['test']['top1']:.4f}", f"{seconds:.0f}"])
    print(f"# cpu-small on the CIFAR-10 dev subset (8,000 / 2,000 real images, not CIFAR-100){' --quick' * args.quick}"
          f"; run folders in {runs}\n")
    print("\n".join("| " + " | ".join(row) + " |" for row in [COLUMNS, ["---"] * len(COLUMNS), *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
