"""What the run folder's TensorBoard logs cost: the seconds `write_tensorboard` takes at the end of an epoch
(after the epoch is committed), for a history of the columns a real run logs, at epoch 1 and as the run
grows. Compare with an epoch's own time (docs/benchmarks.md: tens of seconds to minutes on a CPU).

    python benchmarks/tensorboard_cost.py              # 50 epochs
    python benchmarks/tensorboard_cost.py --epochs 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table  # noqa: E402

# the columns of a run with selective mining (the most a run logs)
COLUMNS = ["accuracy", "loss", "top5", "val_accuracy", "val_loss", "val_top5", "learning_rate", "epoch_seconds",
           "train_seconds", "val_seconds", "other_seconds", "train_images_per_second", "examples_forward",
           "forward_seconds", "examples_backprop", "backprop_seconds", "backprop_fraction", "scored_loss",
           "scored_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    from cifar100.callbacks import write_tensorboard

    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        history = run_dir / "history.csv"
        history.write_text("epoch," + ",".join(COLUMNS) + "\n")
        for epoch in range(1, args.epochs + 1):
            with history.open("a") as handle:
                handle.write(f"{epoch}," + ",".join(f"{0.5 + k / 100 + epoch / 1000:.6f}" for k in range(len(COLUMNS)))
                             + "\n")
            started = time.perf_counter()
            write_tensorboard(run_dir)
            seconds.append(time.perf_counter() - started)
        size = sum(path.stat().st_size for path in (run_dir / "logs").rglob("*") if path.is_file())
    rows = [{"epochs logged": n, "ms at that epoch": seconds[n - 1] * 1000} for n in sorted({1, 2, 10, args.epochs})
            if n <= args.epochs]
    print(f"TensorBoard logs of {len(COLUMNS)} columns: {size / args.epochs / 1024:.1f} KiB per epoch; "
          f"the first call imports tf.summary's writer (machine: {machine()})\n")
    print(table(rows, ["epochs logged", "ms at that epoch"]))


if __name__ == "__main__":
    main()
