"""The command line: `python -m cifar100 --help`."""

from __future__ import annotations

import argparse
import sys

from cifar100 import data


def _data_synthetic(args) -> None:
    path = data.write_synthetic(args.dir, kind=args.kind, n_train=args.train, n_test=args.test, seed=args.seed)
    print(f"wrote a SYNTHETIC {args.kind} dataset ({args.train} train, {args.test} test images) to {path}")


def _data_verify(args) -> None:
    print(data.load(args.dir, check_md5=not args.no_md5).describe())


def _data_download(args) -> None:
    path = data.fetch(args.dir, kind=args.kind)
    print(data.load(path).describe())


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except data.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
