"""`cpu-small` on real images: accuracy and wall time of the preset and of each lever changed alone.

Each variant is the `cpu-small` preset plus the settings named, trained with the command line in a fresh
process on the CIFAR-10 dev subset (`../shared/data/cifar10-dev/`: 8,000 training and 2,000 test real
photographs; NOT CIFAR-100) with the ImageNet weights in `../shared/weights/`. The wall time is the whole
command (imports, data, model, both phases, test evaluation). A finished run folder is reused. Choose on
the validation column; flip TTA (each test image and its mirror image, averaged) is reported apart.

    python benchmarks/real_images.py                                  # every variant below (hours on a CPU)
    python benchmarks/real_images.py --variants cpu-small "head live"
    python benchmarks/real_images.py --image-size 64 --variants ...   # each lever alone, at 64 px (6x cheaper)
    python benchmarks/real_images.py --quick                          # a 1 + 1 epoch check on 400 images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, RUN_COLUMNS, dev_data, machine, run_row, table, train_run  # noqa: E402

# each lever of the preset undone (or pushed) alone; the first row is the preset as it ships
VARIANTS: dict[str, dict] = {
    "cpu-small": {},
    "before #11": dict(image_size=96, head_features="live", head_epochs=3, lr_schedule="plateau", warmup_epochs=0,
                       label_smoothing=0.0, hem=True, hem_fraction=0.2),
    "head live": dict(head_features="live", head_epochs=3),
    "plateau schedule": dict(lr_schedule="plateau", warmup_epochs=0),
    "no label smoothing": dict(label_smoothing=0.0),
    "mining on": dict(hem=True, hem_fraction=0.2),
    "96 px": dict(image_size=96),
    "160 px": dict(image_size=160),
    "no warm-up": dict(warmup_epochs=0),
    "half the training images": dict(max_train_images=3600),
    "12 fine-tuning epochs": dict(finetune_epochs=12),
    # progressive resizing: 12 fine-tuning epochs, the first 6 at 96 px, for about the time of 8 at full size
    "progressive 96 px, 12 epochs": dict(finetune_epochs=12, progressive_size=96, progressive_epochs=6),
    "adamw 0.05": dict(optimizer="adamw", weight_decay=0.05),
    "sgd nesterov": dict(optimizer="sgd", head_learning_rate=0.05, finetune_learning_rate=0.01, weight_decay=5e-4),
    "mobilenetv2": dict(backbone="mobilenetv2"),
    "bfloat16": dict(mixed_precision="bfloat16"),
    # phase 2 on cached activations (finetune_features=cached): the layers below the top fraction run once
    "cached from expanded_conv_4": dict(finetune_features="cached", finetune_fraction=0.65),
    "cached from expanded_conv_4, 224 px": dict(finetune_features="cached", finetune_fraction=0.65, image_size=224),
    "cached from expanded_conv_4, 16 epochs, 4 views": dict(finetune_features="cached", finetune_fraction=0.65,
                                                            finetune_epochs=16, finetune_views=4),
    "cached from expanded_conv_2": dict(finetune_features="cached", finetune_fraction=0.8),
    "mobilenetv2, cached from block_6": dict(backbone="mobilenetv2", finetune_features="cached",
                                             finetune_fraction=0.65),
    "mobilenetv2, cached from block_4": dict(backbone="mobilenetv2", finetune_features="cached",
                                             finetune_fraction=0.75),
    "mobilenetv2, cached from block_6, 16 epochs": dict(backbone="mobilenetv2", finetune_features="cached",
                                                        finetune_fraction=0.65, finetune_epochs=16),
}
QUICK = {"max_train_images": 400, "head_epochs": 1, "finetune_epochs": 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "cifar10-dev")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "data" / "runs")
    parser.add_argument("--image-size", type=int, default=None,
                        help="train every variant at this size (default: the preset's; variants that set one keep it)")
    parser.add_argument("--quick", action="store_true", help="cpu-small and 'head live', 400 images, 1 + 1 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.variants = ["cpu-small", "head live"]
    data_dir = dev_data(args.data)
    rows = []
    for name in args.variants:
        settings = {**({"image_size": args.image_size} if args.image_size else {}), **VARIANTS[name],
                    **(QUICK if args.quick else {})}
        rows.append(run_row(name, train_run("cpu-small", data_dir, args.runs_dir, settings)))
        print(f"  {name}: test top-1 {rows[-1]['test top-1']}, {rows[-1]['wall min']:.1f} min", file=sys.stderr)
    print(f"# cpu-small variants{' (--quick: 400 images, 1 + 1 epochs)' if args.quick else ''}"
          f"{f' at {args.image_size} px' if args.image_size else ''}, CIFAR-10 dev "
          f"subset (8,000 / 2,000 real images, not CIFAR-100) (machine: {machine()})\n")
    print(table(rows, RUN_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
