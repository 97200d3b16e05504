"""Hard-example mining against uniform sampling, on real images: accuracy against wall time.

Arms: `uniform` (no mining), `reweight` (a scoring pass after each epoch weights each example's loss by its
hardness), `selective:S` (Selective-Backprop: each step backpropagates about a fraction S of the batch,
the examples whose loss ranks high). Each arm trains with the project's command line in a fresh process
(a finished run folder is reused), with the same data, budget and seeds; the curve is the validation
accuracy after each epoch against the cumulative training time (epochs, validation and mining's own
scoring included; the one-off feature caching of phase 1 too). Nothing is selected on the test set: the
best checkpoint's test accuracy is reported once per run.

Two datasets:
- `cifar10-dev`: the CIFAR-10 dev subset (`../shared/data/cifar10-dev/`: 8,000 training and 2,000 test real
  photographs, NOT CIFAR-100), the `cpu-small` recipe (MobileNetV3Small with ImageNet weights from
  `../shared/weights/`, phase 1 on cached features, then warm-up + cosine fine-tuning) at a smaller image
  size and training set so that 3 seeds of 4 arms fit in an hour on a 2-core CPU;
- `fashion-mnist`: Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), 28x28 grey
  images padded to 32x32x3 and written in the CIFAR-10 format; the `smoke` preset's tiny CNN from random
  weights (no head phase), Adam 1e-3, 4,000 training images (3,000 for validation), 6 epochs.

    python benchmarks/hard_examples.py --figure docs/figures/hard_examples.png     # both datasets, 3 seeds
    python benchmarks/hard_examples.py --datasets fashion-mnist --arms uniform selective:0.5
    python benchmarks/hard_examples.py --quick                # fashion-mnist, 1 seed, 2,000 images, 2 epochs
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, dev_data, machine, table, train_run  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
ARMS = ["uniform", "reweight", "selective:0.5", "selective:0.33"]
COLUMNS = ["arm", "seeds", "final val top-1", "best-checkpoint test top-1", "train min", "backprop fraction",
           "time to uniform's final val top-1", "vs uniform's time"]
SETUPS = {  # dataset -> (preset, settings)
    "cifar10-dev": ("cpu-small", {"image_size": 64, "max_train_images": 4000, "finetune_epochs": 6}),
    "fashion-mnist": ("smoke", {"weights": None, "max_train_images": 4000, "val_fraction": 0.05,
                                "finetune_epochs": 6, "finetune_learning_rate": 1e-3, "batch_size": 64}),
}
QUICK = {"max_train_images": 2000, "finetune_epochs": 2}


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
    from cifar100 import write_data

    def to_cifar(images):
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        return np.repeat(padded[..., None], 3, axis=3)

    x_train = to_cifar(read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"))
    y_train = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    x_test = to_cifar(read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"))
    y_test = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    return write_data.write_official(target, "cifar10", x_train, y_train, x_test, y_test, synthetic=False,
                               source="Fashion-MNIST (Debian dataset-fashion-mnist), padded to 32x32x3",
                               class_names=FASHION_NAMES)


def arm_settings(arm: str) -> dict:
    """'uniform', 'reweight[:key=value,...]' or 'selective:S' -> the settings of the arm."""
    name, _, rest = arm.partition(":")
    if name == "uniform" and not rest:
        return {"hem": False}
    if name == "selective":
        return {"hem": True, "hem_mode": "selective", "hem_selectivity": float(rest or 0.5)}
    if name == "reweight":
        settings = {"hem": True, "hem_mode": "reweight"}
        for item in filter(None, rest.split(",")):
            key, value = item.split("=")
            settings[f"hem_{key}"] = int(value) if key == "every" else float(value)
        return settings
    raise SystemExit(f"arm {arm!r}: expected uniform, reweight[:key=value,...] or selective:S")


def curve(run_dir: Path, results: dict) -> dict:
    """Validation accuracy after each epoch against the cumulative training time."""
    with open(Path(run_dir) / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    outside = (results.get("mining") or {}).get("mode") == "reweight"  # its scoring runs after the epoch's timer
    seconds = [float(r["epoch_seconds"]) + (float(r.get("forward_seconds") or 0) if outside else 0) for r in rows]
    wall = float(results.get("head_feature_seconds") or 0) + np.cumsum(seconds)
    trained = [float(r.get("examples_backprop") or 0) for r in rows]  # 0 on phase 1's cached features
    seen = results["data"]["train_images"] * max(1, sum(n > 0 for n in trained))
    backprop = sum(trained) if results.get("mining") else seen
    return {"wall": wall.tolist(), "val": [float(r["val_accuracy"]) for r in rows],
            "test": results["test"]["top1"], "backprop_fraction": backprop / seen}


def time_to(run: dict, target: float) -> float | None:
    """Training time until the validation accuracy first reaches `target` (None if it never does)."""
    return next((t for t, v in zip(run["wall"], run["val"], strict=True) if v >= target - 1e-9), None)


def summarise(runs: list[dict], arms: list[str]) -> list[dict]:
    """One row per arm. The time to reach uniform's final validation accuracy is per seed (each seed carves
    its own validation split), then averaged over the seeds that reach it."""
    uniform = {r["seed"]: r for r in runs if r["arm"] == arms[0]}
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        final = np.array([r["val"][-1] for r in mine])
        test = np.array([r["test"] for r in mine])
        reached = [(time_to(r, uniform[r["seed"]]["val"][-1]), uniform[r["seed"]]["wall"][-1]) for r in mine
                   if r["seed"] in uniform]
        times = [(t, base) for t, base in reached if t is not None]
        rows.append({
            "arm": arm, "seeds": len(mine), "final val top-1": f"{final.mean():.4f} ± {final.std():.4f}",
            "best-checkpoint test top-1": f"{test.mean():.4f} ± {test.std():.4f}",
            "train min": np.mean([r["wall"][-1] for r in mine]) / 60,
            "backprop fraction": np.mean([r["backprop_fraction"] for r in mine]),
            "time to uniform's final val top-1":
                f"{np.mean([t for t, _ in times]) / 60:.2f} min ({len(times)}/{len(reached)} seeds reach it)"
                if times else f"not reached (0/{len(reached)} seeds)",
            "vs uniform's time": f"{np.mean([t / base for t, base in times]):.2f}x" if times else "",
        })
    return rows


def figure(runs: list[dict], arms: list[str], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for index, arm in enumerate(arms):
            for number, run in enumerate(r for r in runs if r["arm"] == arm and r["dataset"] == dataset):
                ax.plot(np.array(run["wall"]) / 60, run["val"], "o-", color=f"C{index}", alpha=0.7, markersize=3,
                        label=arm if number == 0 else None)
        ax.set_xlabel("cumulative training time (min), mining included")
        ax.set_ylabel("validation top-1 accuracy")
        ax.set_title(f"{dataset} (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Hard-example mining against uniform sampling, real images")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--arms", nargs="+", default=ARMS, help="the first arm is the baseline")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fashion-mnist, 1 seed, 2,000 images, 2 epochs")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data",
                        help="where the datasets are written (fashion-mnist/, cifar10-dev/)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "data" / "runs")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of accuracy against wall time")
    parser.add_argument("--json", type=Path, default=None, help="write every run's curve here")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds = ["fashion-mnist"], 1
    runs = []
    for dataset in args.datasets:
        folder = args.data_dir / dataset
        data_dir = write_fashion_mnist(folder) if dataset == "fashion-mnist" else dev_data(folder)
        preset, settings = SETUPS[dataset]
        for seed in range(args.seeds):
            for arm in args.arms:
                chosen = {**settings, **(QUICK if args.quick else {}), **arm_settings(arm), "seed": seed}
                results = train_run(preset, data_dir, args.runs_dir, chosen)
                runs.append({"dataset": dataset, "arm": arm, "seed": seed,
                             **curve(Path(results["run_dir"]), results)})
                print(f"  {dataset} {arm} seed {seed}: val {runs[-1]['val'][-1]:.4f}, "
                      f"{runs[-1]['wall'][-1] / 60:.1f} min", file=sys.stderr)
    if args.figure:
        figure(runs, args.arms, args.datasets, args.figure)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    for dataset in args.datasets:
        preset, settings = SETUPS[dataset]
        shown = {**settings, **(QUICK if args.quick else {})}
        print(f"# {dataset}: preset {preset} with {shown}, {args.seeds} seed(s) (machine: {machine()})\n")
        print(table(summarise([r for r in runs if r["dataset"] == dataset], args.arms), COLUMNS) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
