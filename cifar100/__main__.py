"""The command line: `python -m cifar100 COMMAND`. `train` runs main.ipynb's cells; the others read run folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar100.config import PRESETS, UserError, printable


def _train(args) -> None:
    from cifar100 import notebook

    notebook.run(notebook.cli_parameters(args.preset, args.data, args.run_dir, args.set, args.verbose))


def _data(args) -> None:
    from cifar100 import data

    if args.action == "synthetic":
        print(f"wrote SYNTHETIC data (not CIFAR): {data.write_synthetic(args.dir, args.kind, args.train, args.test)}")
        return
    dataset = data.load(args.dir, download_if_missing=args.action == "download")
    print(f"{args.dir}: {dataset.name}, {len(dataset.y_train)} training and {len(dataset.y_test)} test images, "
          f"{dataset.num_classes} classes")


def _run_data(args):
    """The run's best model, settings and dataset (its own, or --data)."""
    from cifar100 import data, evaluate

    config = evaluate.run_config(args.run_dir)
    return evaluate.load_model(Path(args.run_dir) / "best.keras"), config, data.load(args.data or config.data_dir)


def _evaluate(args) -> None:
    from cifar100 import data, evaluate, runs

    model, config, dataset = _run_data(args)
    results = evaluate.results(model, dataset, data.split(dataset, config)[1], [])
    if not args.data:
        runs.write_json(Path(args.run_dir) / "results.json", {**runs.read_json(Path(args.run_dir) / "results.json"),
                                                              "validation": results["validation"],
                                                              "test": results["test"]})
    test = results["test"]
    print(f"{dataset.name}: test top-1 {test['top1']:.4f}, top-5 {test['top5']:.4f}"
          + (f", superclass {test['superclass']:.4f}" if "superclass" in test else "")
          + f"; validation top-1 {results['validation']['top1']:.4f}")


def _figures(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from cifar100 import data, report, runs

    model, config, dataset = _run_data(args)
    run_dir = Path(args.run_dir)
    results = runs.read_json(run_dir / "results.json")
    report.training_curves(run_dir)
    report.confusion(results, dataset, run_dir)
    report.per_class_accuracy(results, dataset, run_dir)
    report.misclassified(results, dataset, run_dir)
    report.hardest_examples(model, *data.split(dataset, config)[0], dataset, run_dir)
    print(f"figures: {run_dir / 'figures'}")


def _predict(args) -> int:
    from cifar100 import evaluate

    model = evaluate.load_model(Path(args.run_dir) / "best.keras")
    names = evaluate.class_names(args.run_dir)
    failed = 0
    for path in args.images:
        try:
            image = evaluate.load_image(path)
        except UserError as exc:
            print(f"error: {printable(exc)}", file=sys.stderr)
            failed += 1
            continue
        probabilities = model.predict(image[None], verbose=0)[0]
        top = probabilities.argsort()[::-1][:5]
        print(f"{path}: " + ", ".join(f"{names[i]} {probabilities[i]:.3f}" for i in top))
    return 1 if failed else 0


def _export(args) -> None:
    from cifar100 import evaluate

    report = evaluate.export(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} to {args.out_dir}: " + ", ".join(
        f"{name} (max difference {check['max_probability_difference']:.1e})" for name, check in report.items()))


def _compare(args) -> None:
    from cifar100 import report

    report.compare(args.runs_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar100", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write SYNTHETIC data, verify a dataset folder, or download CIFAR-100")
    data.add_argument("action", choices=["synthetic", "verify", "download"])
    data.add_argument("dir", nargs="?", default="cifar-100-python")
    data.add_argument("--kind", choices=["cifar100", "cifar10"], default="cifar100", help="synthetic: the format")
    data.add_argument("--train", type=int, default=5000, help="synthetic: training images")
    data.add_argument("--test", type=int, default=1000, help="synthetic: test images")
    data.set_defaults(func=_data)
    train = commands.add_parser("train", help="run main.ipynb's recipe headless: train (or resume) a run, then test")
    train.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    train.add_argument("--data", help="dataset folder (default: cifar-100-python)")
    train.add_argument("--run-dir", help="the run folder (default: models/<named by the settings and recipe>)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting (repeatable)")
    train.add_argument("--verbose", type=int, default=2, help="Keras progress: 1 bars, 2 a line per epoch")
    train.set_defaults(func=_train)
    for name, func, text in (("evaluate", _evaluate, "test metrics of a run's best.keras"),
                             ("figures", _figures, "draw a finished run's figures into its figures/")):
        command = commands.add_parser(name, help=text)
        command.add_argument("run_dir")
        command.add_argument("--data", help="another dataset folder (default: the run's data_dir)")
        command.set_defaults(func=func)
    predict = commands.add_parser("predict", help="top-5 classes of image files (PNG, JPEG; any size)")
    predict.add_argument("run_dir")
    predict.add_argument("images", nargs="+")
    predict.set_defaults(func=_predict)
    export = commands.add_parser("export", help="best.keras as a SavedModel and TFLite, each checked")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.set_defaults(func=_export)
    compare = commands.add_parser("compare", help="every finished run, best validation top-1 first")
    compare.add_argument("runs_dir", nargs="?", default="models")
    compare.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a training run resumes at its last finished epoch when started again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
