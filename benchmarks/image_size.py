"""The original project's claim, as a curve: test top-1 and wall time against image size, on real images.

Trains the `cpu-small` recipe (as the preset ships it, but for the image size) on the CIFAR-10 dev subset
(`../shared/data/cifar10-dev/`: 8,000 training and 2,000 test real photographs; NOT CIFAR-100) at each image
size, with the command line, one fresh process per run, and the ImageNet weights in `../shared/weights/`.
A finished run folder is reused, not trained again. Prints a table and draws docs/figures/image_size.png.
Choose a size on the validation column; the test column is reported, never tuned on.

    python benchmarks/image_size.py                        # 32, 64, 96, 128, 160 px (add 192 224 on a GPU)
    python benchmarks/image_size.py --sizes 32 64 --set finetune_epochs=2
    python benchmarks/image_size.py --quick                # 2 sizes of a 1 + 1 epoch run on 400 images
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, RUN_COLUMNS, dev_data, machine, run_row, table, train_run  # noqa: E402

FIGURE = ROOT / "docs" / "figures" / "image_size.png"
QUICK = {"max_train_images": 400, "head_epochs": 1, "finetune_epochs": 1}


def parse_settings(items: list[str]) -> dict:
    from cifar100.config import make_config

    return make_config("cpu-small", items).changed_from_preset() if items else {}


def draw(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["image size"] for row in rows]
    figure, accuracy_axis = plt.subplots(figsize=(7, 4.2))
    accuracy_axis.plot(sizes, [float(row["test top-1"].rstrip("%")) for row in rows], "o-", color="C0",
                       label="test top-1")
    accuracy_axis.plot(sizes, [float(row["val top-1"].rstrip("%")) for row in rows], "s--", color="C0", alpha=0.5,
                       label="validation top-1")
    accuracy_axis.set_xlabel("image size the 32x32 images are upsampled to (px)")
    accuracy_axis.set_ylabel("top-1 accuracy (%)", color="C0")
    accuracy_axis.set_xticks(sizes)
    time_axis = accuracy_axis.twinx()
    time_axis.plot(sizes, [row["wall min"] for row in rows], "^:", color="C3", label="wall time")
    time_axis.set_ylabel("wall time of the whole run (minutes)", color="C3")
    time_axis.set_ylim(bottom=0)
    handles = accuracy_axis.get_legend_handles_labels()[0] + time_axis.get_legend_handles_labels()[0]
    accuracy_axis.legend(handles=handles, loc="lower right", fontsize=8)
    accuracy_axis.grid(alpha=0.3)
    accuracy_axis.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 96, 128, 160])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a cpu-small setting")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "cifar10-dev")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "data" / "runs")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--quick", action="store_true", help="2 sizes, 400 images, 1 + 1 epochs (a check)")
    args = parser.parse_args(argv)
    settings = parse_settings(args.set)
    if args.quick:
        args.sizes, settings = [32, 48], {**QUICK, **settings}
        args.figure = args.runs_dir / "image_size_quick.png"
    data_dir = dev_data(args.data)
    rows = []
    for size in args.sizes:
        results = train_run("cpu-small", data_dir, args.runs_dir, {**settings, "image_size": size})
        rows.append(run_row(f"{size} px", results))
        print(f"  {size} px: test top-1 {rows[-1]['test top-1']}, {rows[-1]['wall min']:.1f} min", file=sys.stderr)
    rows.sort(key=lambda row: row["image size"])
    changes = " ".join(f"{key}={value}" for key, value in settings.items())
    print(f"# Image size, cpu-small recipe{' with ' + changes if changes else ''}, CIFAR-10 dev subset "
          f"(8,000 / 2,000 real images, not CIFAR-100) (machine: {machine()})\n")
    print(table(rows, RUN_COLUMNS))
    draw(rows, args.figure, "cpu-small recipe on the CIFAR-10 dev subset (real images, not CIFAR-100)\n"
         + textwrap.shorten(f"{changes} " if changes else "", 100) + f"machine: {machine()}")
    print(f"\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
