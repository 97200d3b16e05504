"""The command line: `python -m cifar100 --help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar100 import data, download, run_folder, tflogs, write_data
from cifar100.config import PRESETS, Config, make_config
from cifar100.errors import RunError, UserError


def _data_synthetic(args) -> None:
    path = write_data.write_synthetic(args.dir, kind=args.kind, n_train=args.train, n_test=args.test, seed=args.seed)
    print(f"wrote a SYNTHETIC {args.kind} dataset ({args.train} train, {args.test} test images) to {path}")


def _data_verify(args) -> None:
    print(data.load(args.dir, check_md5=not args.no_md5).describe())


def _data_download(args) -> None:
    path = download.fetch(args.dir, kind=args.kind)
    print(data.load(path).describe())


def _train(args) -> None:
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data_dir={args.data}")
    config = make_config(args.preset, overrides)  # a mistyped setting is refused before TensorFlow loads
    if args.run_dir:
        run_dir = Path(args.run_dir)
        config = config.replace(runs_dir=str(run_dir.parent), name=run_dir.name)
    tflogs.import_keras()
    from cifar100 import train

    run_dir = train.run(config, verbose=args.verbose)
    if run_folder.finished(run_dir):
        _print_results(run_dir)
    else:  # another worker of a multi-worker run: the chief may still be evaluating
        print(f"this worker is done; the chief (worker 0) writes {run_dir}")


def _print_results(run_dir: Path) -> None:

    results = run_folder.read_json(run_dir / "results.json")
    info = results.get("data") if isinstance(results.get("data"), dict) else {}
    note = data.caveat(info.get("synthetic") is not False, info.get("official"))
    test = results.get("test")
    if not isinstance(test, dict) or not all(isinstance(test.get(k), int | float) for k in ("top1", "top5", "images")):
        raise RunError(f"{run_dir / 'results.json'}: damaged results.json (no test top1, top5 and images); run "
                       f"`python -m cifar100 evaluate {run_dir}` to write them again")
    print(f"{run_dir}: test top-1 {test['top1']:.4f}, top-5 {test['top5']:.4f} on {test['images']} images{note}")


def _evaluate(args) -> None:
    tflogs.import_keras()
    from cifar100 import evaluate

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    other = data.load(args.data) if args.data else None
    with run_folder.RunLock(run_dir):  # not while a training run writes the folder
        metrics = evaluate.evaluate_run(run_dir, dataset=other)
    own_data = Path(Config.load(run_dir / "config.json").data_dir).resolve()
    if other is not None and Path(other.path).resolve() != own_data:
        note = (" (SYNTHETIC data)" if other.synthetic else
                " (not verified as the official files: md5 not checked)" if not other.official else "")
        print(f"{run_dir} on {other.path}: test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f} on "
              f"{metrics['images']} images{note}; not the run's own data: its results.json is left as it is")
    else:
        _print_results(run_dir)
    if "superclass_accuracy" in metrics:
        print(f"superclass accuracy {metrics['superclass_accuracy']:.4f}")
    for pair in metrics["most_confused"][:5]:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")


def _predict(args) -> int:
    """Predicts every readable image; each unreadable one is named on stderr, and the exit status is then 2."""
    tflogs.import_keras()
    from cifar100 import evaluate

    status = 0
    classes = Path(args.run_dir) / "classes.json"
    if classes.is_file() and run_folder.read_json(classes).get("synthetic"):
        print(f"note: {args.run_dir} was trained on SYNTHETIC data, not CIFAR-100: its predictions mean nothing "
              "for real images", file=sys.stderr)
    for path, top in zip(args.images, evaluate.predict_files(args.run_dir, args.images), strict=True):
        if isinstance(top, UserError):
            print(f"error: {top}", file=sys.stderr)
            status = 2
        else:
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return status


def _export(args) -> None:
    tflogs.import_keras()
    from cifar100 import evaluate

    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"{args.run_dir}: run folder not found")
    with run_folder.RunLock(args.run_dir):  # not while a training run writes the folder
        report = evaluate.export_run(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} to {args.out_dir}, checked on {report['checked_on']}:")
    for check in report["formats"].values():
        print(f"  {check['file']}: top-1 as predict's on {check['top1_agrees']:.0%}, largest probability "
              f"difference {check['max_probability_difference']:.1e}")
    if "onnx" not in report["formats"]:
        print("  (no ONNX: pip install tf2onnx onnxruntime)")


def _compare(args) -> None:
    from cifar100 import compare

    if not Path(args.runs_dir).is_dir():
        raise FileNotFoundError(f"{args.runs_dir}: runs folder not found")
    print(compare.format_table(compare.group_runs(compare.find_runs(args.runs_dir))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar100", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data_parser = commands.add_parser("data", help="write, verify or download a dataset")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True)
    synthetic = data_commands.add_parser("synthetic", help="write a synthetic dataset in the official format")
    synthetic.add_argument("dir")
    synthetic.add_argument("--kind", choices=["cifar100", "cifar10"], default="cifar100")
    synthetic.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    synthetic.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(func=_data_synthetic)
    verify = data_commands.add_parser("verify", help="load and check a dataset folder, print a summary")
    verify.add_argument("dir")
    verify.add_argument("--no-md5", action="store_true", help="skip the official md5 check (your own data)")
    verify.set_defaults(func=_data_verify)
    download = data_commands.add_parser("download", help="download the official dataset")
    download.add_argument("dir", nargs="?", default="cifar-100-python")
    download.add_argument("--kind", choices=["cifar100", "cifar10"], default="cifar100")
    download.set_defaults(func=_data_download)

    train = commands.add_parser("train", help="train (or resume) a run")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None)
    train.add_argument("--data", help="dataset folder (default: the preset's data_dir, cifar-100-python)")
    train.add_argument("--run-dir", help="run folder (default: models/<preset>[-<what differs>-<hash>], named by "
                       "the settings, or models/<name> with --set name=...)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set image_size=128 --set weights=None")
    train.add_argument("--verbose", type=int, default=1, help="Keras progress: 1 bars, 2 a line per epoch, 0 none")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="test metrics of a run's best checkpoint")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="dataset folder (default: the run's data_dir)")
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="top-5 classes of image files (PNG, JPEG, any size)")
    predict.add_argument("run_dir")
    predict.add_argument("images", nargs="+")
    predict.set_defaults(func=_predict)

    export = commands.add_parser("export", help="write a run's model as a SavedModel, TFLite and ONNX file")
    export.add_argument("run_dir", help="a finished run folder")
    export.add_argument("out_dir", help="a new folder for the exported files")
    export.set_defaults(func=_export)

    compare = commands.add_parser("compare", help="a table of every finished run, grouped by dataset, best "
                                  "validation top-1 first")
    compare.add_argument("runs_dir", nargs="?", default="models", help="the runs folder (default: models)")
    compare.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, OSError) as exc:  # OSError: a file or folder that cannot be read or written, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was saved is kept; the same command resumes a training run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
