"""Test-time resolution: a finished run's best checkpoint evaluated on its validation split with the images
upsampled to other sizes than the one it trained at (the backbone is convolutional up to its pooling, so its
weights fit any size). Choose on the validation column; `--test SIZE` then reports the test set once, at that size.

    python benchmarks/test_resolution.py models/cpu-small --sizes 160 176 192 224
    python benchmarks/test_resolution.py models/cpu-small --sizes 192 --test 192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table  # noqa: E402

COLUMNS = ["evaluated at", "val top-1", "val top-5", "val loss", "test top-1"]


def evaluate_at(run_dir: Path, sizes: list[int], test_size: int | None = None, data_dir: str | None = None) -> list:
    """One row per size: the validation metrics of best.keras with its upsampling set to that size."""
    from cifar100 import data, evaluate
    from cifar100.config import Config

    config = Config.load(run_dir / "config.json")
    config = config.replace(data_dir=data_dir) if data_dir else config
    splits = data.prepare_data(config)
    classes = splits.dataset.num_classes
    rows = []
    for size in sizes:
        model = evaluate.load_checkpoint(run_dir / "best.keras", config.replace(image_size=size), classes)
        val = evaluate.basic_metrics(model, splits.x_val, splits.y_val, classes)
        test = (evaluate.basic_metrics(model, splits.dataset.x_test, splits.dataset.y_test, classes)["top1"]
                if size == test_size else None)
        rows.append({"evaluated at": f"{size} px" + (" (trained)" if size == config.image_size else ""),
                     "val top-1": f"{val['top1']:.1%}", "val top-5": f"{val['top5']:.1%}",
                     "val loss": round(val["loss"], 4), "test top-1": "" if test is None else f"{test:.1%}"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run folder")
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--test", type=int, default=None, help="also the test top-1 at this size (once)")
    parser.add_argument("--data", default=None, help="the run's dataset folder, when it moved")
    args = parser.parse_args(argv)
    rows = evaluate_at(args.run_dir, args.sizes, args.test, args.data)
    print(f"# test-time resolution of {args.run_dir} (machine: {machine()})\n")
    print(table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
