"""Hard-example mining against plain uniform sampling, on real data: Fashion-MNIST.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist);
its 28x28 grey images are padded to 32x32, repeated to 3 channels and written in the official CIFAR-10
file format, so the project's own reader and training loop run unchanged. Each arm trains the same model
with the same budget (epochs, images per epoch) for every seed; the test accuracy is recorded after every
epoch (for this comparison only: nothing is selected on it) together with the cumulative training time,
hard-example mining's scoring time included.

    python benchmarks/hard_examples.py                       # 10,000 training images, 3 seeds, 1 + 7 epochs
    python benchmarks/hard_examples.py --quick               # 2,000 images, 1 seed, 1 + 1 epochs
    python benchmarks/hard_examples.py --arms uniform hem:strength=2,fraction=0.5
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine, table  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
COLUMNS = ["arm", "seeds", "epochs", "test top-1 at equal epochs", "test top-1 at equal wall time",
           "best-checkpoint test top-1", "train s/epoch", "mining s/epoch", "mining cost"]


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion_mnist(target: Path) -> Path:
    """Fashion-MNIST as a CIFAR-10-format folder (written once)."""
    if (target / "batches.meta").exists():
        return target
    if not FASHION_DIR.is_dir():
        raise SystemExit(f"{FASHION_DIR} not found: install Debian's package with "
                         "`apt-get install dataset-fashion-mnist`")
    from cifar100 import data

    def to_cifar(images):
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        return np.repeat(padded[..., None], 3, axis=3)

    x_train = to_cifar(read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"))
    y_train = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    x_test = to_cifar(read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"))
    y_test = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    return data.write_official(target, "cifar10", x_train, y_train, x_test, y_test, synthetic=False,
                               source="Fashion-MNIST (Debian dataset-fashion-mnist), padded to 32x32x3",
                               class_names=FASHION_NAMES)


def parse_arm(text: str) -> tuple[str, dict]:
    """'uniform' or 'hem:key=value,...' -> (label, config overrides)."""
    if text == "uniform":
        return text, {"hem": False}
    if not text.startswith("hem"):
        raise SystemExit(f"arm {text!r}: expected 'uniform' or 'hem[:key=value,...]'")
    settings = {"hem": True}
    for item in filter(None, text.partition(":")[2].split(",")):
        key, value = item.split("=")
        settings[f"hem_{key}"] = int(value) if key in ("every", "keep") else float(value)
    return text, settings


def test_curve_callback(x_test, y_test):
    import keras

    class TestCurve(keras.callbacks.Callback):
        """Test accuracy after every epoch, for this benchmark's comparison only."""

        def __init__(self):
            super().__init__()
            self.accuracy = []

        def on_epoch_end(self, epoch, logs=None):
            predicted = self.model.predict(x_test, batch_size=512, verbose=0).argmax(1)
            self.accuracy.append(float(np.mean(predicted == y_test)))

    return TestCurve()


def run_arm(label, overrides, seed, data_dir, runs_dir, args) -> dict:
    from cifar100 import data, train
    from cifar100.config import Config, make_config
    from cifar100.run_folder import history_rows

    defaults = Config()  # the project's mining defaults, not the smoke preset's
    mining_defaults = {name: getattr(defaults, name) for name in ("hem_every", "hem_fraction", "hem_strength",
                                                                   "hem_floor")}
    config = make_config("smoke", {**mining_defaults,
        "data_dir": str(data_dir), "runs_dir": str(runs_dir), "name": f"{label.replace(':', '_')}-seed{seed}",
        "seed": seed, "max_train_images": args.images, "head_epochs": 1, "finetune_epochs": args.epochs - 1,
        "finetune_learning_rate": 1e-3, "early_stopping_patience": 1000, "reduce_lr_patience": 1000,
        "batch_size": 64, **overrides})
    dataset = data.load(data_dir)
    curve = test_curve_callback(dataset.x_test[: args.test_images], dataset.y_test[: args.test_images])
    run_dir = train.run(config, verbose=0, callbacks=[curve])
    rows = history_rows(run_dir)
    train_seconds = np.array([float(r["epoch_seconds"]) for r in rows])
    mining_seconds = np.array([float(r.get("hem_seconds") or 0) for r in rows])
    results = json.loads((run_dir / "results.json").read_text())
    return {"arm": label, "seed": seed, "test_curve": curve.accuracy,
            "wall": np.cumsum(train_seconds + mining_seconds).tolist(),
            "train_seconds": train_seconds.tolist(), "mining_seconds": mining_seconds.tolist(),
            "best_test": results["test"]["top1"]}


def accuracy_at(run: dict, seconds: float) -> float:
    """Test accuracy of the last epoch finished within `seconds` of training time (0 if none)."""
    finished = [acc for acc, t in zip(run["test_curve"], run["wall"], strict=True) if t <= seconds + 1e-9]
    return finished[-1] if finished else 0.0


def summarise(runs: list[dict], arms: list[str]) -> list[dict]:
    baseline_time = {r["seed"]: r["wall"][-1] for r in runs if r["arm"] == arms[0]}
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        final = np.array([r["test_curve"][-1] for r in mine])
        at_time = np.array([accuracy_at(r, baseline_time[r["seed"]]) for r in mine])
        train_s = np.mean([np.mean(r["train_seconds"]) for r in mine])
        mining_s = np.mean([np.mean(r["mining_seconds"]) for r in mine])
        rows.append({"arm": arm, "seeds": len(mine), "epochs": len(mine[0]["test_curve"]),
                     "test top-1 at equal epochs": f"{final.mean():.4f} ± {final.std():.4f}",
                     "test top-1 at equal wall time": f"{at_time.mean():.4f} ± {at_time.std():.4f}",
                     "best-checkpoint test top-1": f"{np.mean([r['best_test'] for r in mine]):.4f}",
                     "train s/epoch": train_s, "mining s/epoch": mining_s,
                     "mining cost": f"{100 * mining_s / train_s:.1f}%"})
    return rows


def figure(runs: list[dict], arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, arm in enumerate(arms):
        color = f"C{index}"
        for number, run in enumerate(r for r in runs if r["arm"] == arm):
            ax.plot(run["wall"], run["test_curve"], "o-", color=color, alpha=0.7, markersize=3,
                    label=arm if number == 0 else None)
    ax.set_xlabel("cumulative training time, mining included (s)")
    ax.set_ylabel("Fashion-MNIST test top-1 accuracy")
    ax.set_title("Hard-example mining vs uniform sampling (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 images, 1 seed, 2 epochs")
    parser.add_argument("--arms", nargs="+", default=["uniform", "hem"], help="first arm is the baseline")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10000, help="training images (stratified cap)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=8, help="1 frozen + the rest fine-tuning")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data" / "fashion-mnist")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of accuracy against wall time")
    parser.add_argument("--json", type=Path, default=None, help="write every run's curves here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.images, args.test_images, args.epochs = 1, 2000, 2000, 2
    data_dir = write_fashion_mnist(args.data_dir)
    arms = [parse_arm(a) for a in args.arms]
    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in range(args.seeds):
            for label, overrides in arms:
                runs.append(run_arm(label, overrides, seed, data_dir, Path(runs_dir), args))
                print(f"  {label} seed {seed}: test {runs[-1]['test_curve'][-1]:.4f}", file=sys.stderr)
    labels = [label for label, _ in arms]
    if args.figure:
        figure(runs, labels, args.figure)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(f"# Hard-example mining on Fashion-MNIST (machine: {machine()}; tinycnn at 32 px from random weights, "
          f"{args.images} training images, batch 64, Adam 3e-3 then 1e-3; {time.perf_counter() - started:.0f} s "
          "in all)\n")
    print(table(summarise(runs, labels), COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
