"""The command line: `python -m cifar100 --help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar100 import data, run_folder, write_data
from cifar100.config import PRESETS, Config, RunError, UserError, make_config, printable

DESCRIPTION = """Fine-tune an ImageNet-pretrained Keras backbone on CIFAR-100 (the same code as main.ipynb).

  python -m cifar100 data download                        # the official CIFAR-100 into cifar-100-python/
  python -m cifar100 train --preset cpu-small             # a run into models/, resumed if stopped
  python -m cifar100 figures models/cpu-small             # its figures, as PNG
  python -m cifar100 compare                              # every finished run, side by side

`python -m cifar100 COMMAND --help` says more of each command."""


def _data_synthetic(args) -> None:
    path = write_data.write_synthetic(args.dir, kind=args.kind, n_train=args.train, n_test=args.test, seed=args.seed)
    print(f"wrote a SYNTHETIC {args.kind} dataset ({args.train} train, {args.test} test images) to {path}")


def _data_verify(args) -> None:
    print(data.load(args.dir, check_md5=not args.no_md5).describe())


def _data_download(args) -> None:
    path = write_data.fetch(args.dir, kind=args.kind)
    print(data.load(path).describe())


def _train(args) -> None:
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data_dir={args.data}")
    config = make_config(args.preset, overrides)  # a mistyped setting is refused before TensorFlow loads
    if args.run_dir:
        run_dir = Path(args.run_dir)
        config = config.replace(runs_dir=str(run_dir.parent), name=run_dir.name)
    from cifar100 import train

    # Keras' progress bar redrawn at every step is for a terminal; to a file or a pipe, a line per epoch
    verbose = 2 if args.verbose == 1 and not sys.stdout.isatty() else args.verbose
    run_dir = train.run(config, verbose=verbose)
    if run_folder.finished(run_dir):
        _print_results(run_dir)
    else:  # another worker of a multi-worker run: the chief may still be evaluating
        print(f"this worker is done; the chief (worker 0) writes {run_dir}")


def _print_results(run_dir: Path) -> None:
    results = run_folder.read_json(run_dir / "results.json")
    info = results.get("data") if isinstance(results.get("data"), dict) else {}
    note = data.caveat(info.get("synthetic") is not False, info.get("official"), str(info.get("kind", "?")))
    test = results.get("test")
    if not isinstance(test, dict) or not all(run_folder.is_number(test.get(k), 0, 1) for k in ("top1", "top5")) \
            or not run_folder.is_number(test.get("images"), 1, 1e12):
        raise RunError(f"{run_dir / 'results.json'}: damaged results.json (no test top1, top5 and images); run "
                       f"`python -m cifar100 evaluate {run_dir}` to write them again")
    print(f"{run_dir}: test top-1 {test['top1']:.4f}, top-5 {test['top5']:.4f} on {test['images']} images{note}")


def _evaluate(args) -> None:
    from cifar100 import evaluate

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    other = data.load(args.data) if args.data else None
    with run_folder.RunLock(run_dir):  # not while a training run writes the folder
        metrics = evaluate.evaluate_run(run_dir, dataset=other)
    own_data = Path(Config.load(run_dir / "config.json").data_dir).resolve()
    if other is not None and Path(other.path).resolve() != own_data:
        print(f"{run_dir} on {other.path}: test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f} on "
              f"{metrics['images']} images{other.caveat}; not the run's own data: its results.json is left as it is")
    else:
        _print_results(run_dir)
    if "superclass_accuracy" in metrics:
        print(f"superclass accuracy {metrics['superclass_accuracy']:.4f}")
    for pair in metrics["most_confused"][:5]:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")


def _predict(args) -> int:
    """Predicts every readable image; each unreadable one is named on stderr, and the exit status is then 2."""
    from cifar100 import evaluate

    status = 0
    info = data.read_classes(args.run_dir) if (Path(args.run_dir) / "classes.json").is_file() else {}
    if info.get("synthetic"):
        print(f"note: {args.run_dir} was trained on SYNTHETIC data, not {data.display_name(info.get('kind'))}: its "
              "predictions mean nothing for real images", file=sys.stderr)
    for path, top in zip(args.images, evaluate.predict_files(args.run_dir, args.images), strict=True):
        if isinstance(top, UserError):
            print(f"error: {printable(str(top))}", file=sys.stderr)
            status = 2
        else:
            print(f"{printable(path)}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return status


def _export(args) -> None:
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


def _figures(args) -> None:
    from cifar100 import plots  # matplotlib only: no TensorFlow

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    if not run_folder.finished(run_dir):
        raise RunError(f"{run_dir}: not a finished run (no results yet): train it to the end first")
    dataset = data.load(args.data or Config.load(run_dir / "config.json").data_dir)
    with run_folder.RunLock(run_dir):  # not while a training run writes the folder
        figures = plots.run_figures(run_dir, dataset)
    for name, figure in figures.items():
        print(f"{run_dir / 'figures' / name}.png" if not isinstance(figure, str) else f"({name}: {figure})")


def _compare(args) -> None:
    from cifar100 import compare

    if not Path(args.runs_dir).is_dir():
        raise FileNotFoundError(f"{args.runs_dir}: runs folder not found")
    print(compare.format_table(compare.group_runs(compare.find_runs(args.runs_dir))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar100", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str = "", parent=commands):
        return parent.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")

    data_parser = command("data", "write, verify or download a dataset")
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synthetic = command("synthetic", "write a SYNTHETIC dataset in the official file format (for tests and demos)",
                        parent=data_commands)
    synthetic.add_argument("dir", help="a new folder for it (an existing dataset is never overwritten)")
    synthetic.add_argument("--kind", choices=["cifar100", "cifar10"], default="cifar100", help="the format")
    synthetic.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    synthetic.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    synthetic.add_argument("--seed", type=int, default=0, help="the random seed of the images (default 0)")
    synthetic.set_defaults(func=_data_synthetic)
    verify = command("verify", "load and check a dataset folder (shapes, labels, md5 sums) and describe it",
                     parent=data_commands)
    verify.add_argument("dir", help="the dataset folder, e.g. cifar-100-python")
    verify.add_argument("--no-md5", action="store_true", help="skip the official md5 check (your own data)")
    verify.set_defaults(func=_data_verify)
    download = command("download", "download the official dataset archive, check its md5 and unpack it",
                       parent=data_commands)
    download.add_argument("dir", nargs="?", default="cifar-100-python", help="where (default: cifar-100-python)")
    download.add_argument("--kind", choices=["cifar100", "cifar10"], default="cifar100", help="which dataset")
    download.set_defaults(func=_data_download)

    train = command("train", "train (or resume) a run: both phases, then the test set once",
                    "Train a run into its run folder, or resume it where it stopped; the same settings again find "
                    "the finished run and train nothing. Settings: a preset, then --set KEY=VALUE for any other.")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the recipe to start from "
                       "(default: none, the settings' own defaults)")
    train.add_argument("--data", help="dataset folder (default: the preset's data_dir, cifar-100-python)")
    train.add_argument("--run-dir", help="run folder (default: models/<preset>[-<what differs>-<hash>], named by "
                       "the settings, or models/<name> with --set name=...)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set image_size=128 --set weights=None (repeatable)")
    train.add_argument("--verbose", type=int, default=1, help="Keras progress: 1 a bar on a terminal (a line per "
                       "epoch otherwise), 2 a line per epoch, 0 none")
    train.set_defaults(func=_train)

    evaluate = command("evaluate", "the test metrics of a finished run's best checkpoint (best.keras)")
    evaluate.add_argument("run_dir", help="a run folder, e.g. models/cpu-small")
    evaluate.add_argument("--data", help="another dataset folder to test on (default: the run's own data_dir; "
                          "its results.json changes only on its own data)")
    evaluate.set_defaults(func=_evaluate)

    figures = command("figures", "draw every figure of a finished run into its figures/ folder (PNG)")
    figures.add_argument("run_dir", help="a finished run folder")
    figures.add_argument("--data", help="the run's dataset folder, when it moved (default: the run's data_dir)")
    figures.set_defaults(func=_figures)

    predict = command("predict", "the top-5 classes of image files (PNG, JPEG; any size, resized to 32x32)")
    predict.add_argument("run_dir", help="a finished run folder (its best.keras and classes.json)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.set_defaults(func=_predict)

    export = command("export", "write a run's model as a SavedModel, TFLite and ONNX file, each checked")
    export.add_argument("run_dir", help="a finished run folder")
    export.add_argument("out_dir", help="a new folder for the exported files")
    export.set_defaults(func=_export)

    compare = command("compare", "a table of every finished run, grouped by dataset, best validation top-1 first")
    compare.add_argument("runs_dir", nargs="?", default="models", help="the runs folder (default: models)")
    compare.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, OSError) as exc:  # OSError: a file or folder that cannot be read or written, named
        print(f"error: {printable(str(exc))}", file=sys.stderr)  # names from files: no terminal escapes
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was saved is kept; the same command resumes a training run", file=sys.stderr)
        return 130
    finally:  # an error in fit's first step: its message, held back with TensorFlow's lines, is written out
        if "cifar100.keras_internals" in sys.modules:
            sys.modules["cifar100.keras_internals"].release_held_stderr()


if __name__ == "__main__":
    sys.exit(main())
