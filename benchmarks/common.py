"""Shared helpers of the benchmark scripts: machine description, tables, running one measurement per process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """Cores, memory and device, for the header of every table."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB"
            + (f", CUDA_VISIBLE_DEVICES={gpus}" if gpus else ""))


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` in the order of `columns`."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def run_isolated(script: str, arguments: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run `python SCRIPT --child ARGS` in a fresh process (own peak memory, own thread settings) and return
    the JSON object it prints on its last line."""
    result = subprocess.run([sys.executable, script, "--child", *arguments], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- training runs on the real-image development set (benchmarks/real_images.py, benchmarks/image_size.py)

SHARED = ROOT.parent / "shared"
DEV_BUILDER = SHARED / "data" / "cifar10-dev" / "build.py"
WEIGHT_FILES = {"mobilenetv2": SHARED / "weights" / "mobilenet_v2_1.0_imagenet_notop.weights.h5",
                "mobilenetv3small": SHARED / "weights" / "mobilenet_v3_small_1.0_imagenet_notop.weights.h5"}


def dev_data(path: Path) -> Path:
    """The CIFAR-10 dev subset (8,000 train / 2,000 test real images) in the official format, built once."""
    path = Path(path)
    if not (path / "batches.meta").exists():
        if not DEV_BUILDER.exists():
            raise SystemExit(f"{DEV_BUILDER} not found: these benchmarks need ../shared/data/cifar10-dev/")
        subprocess.run([sys.executable, str(DEV_BUILDER), str(path)], check=True)
    return path


def shared_weights(backbone: str) -> str:
    """The offline ImageNet weights file of a backbone in ../shared/weights/ ("imagenet" downloads them)."""
    path = WEIGHT_FILES.get(backbone)
    return str(path) if path is not None and path.exists() else "imagenet"


def run_command(command: list[str], timeout: float) -> None:
    """Run a training command in a fresh process; its output goes in the error when it fails."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def train_run(preset: str, data_dir: Path, runs_dir: Path, settings: dict, timeout: float = 3 * 3600) -> dict:
    """Train one run with the project's command line in a fresh process, or reuse its finished run folder.

    Returns its results.json plus `wall_seconds`: the whole command, from process start (imports, data,
    model) to the test evaluation, measured here and kept in the run folder's benchmark.json.
    """
    import time

    from cifar100.config import make_config

    settings = {"weights": shared_weights(settings.get("backbone") or make_config(preset).backbone), **settings,
                "runs_dir": str(runs_dir)}
    config = make_config(preset, {**settings, "data_dir": str(data_dir)})
    record = config.run_dir() / "benchmark.json"
    if not record.exists():
        command = [sys.executable, "-m", "cifar100", "train", "--preset", preset, "--data", str(data_dir),
                   "--verbose", "2"] + [f"--set={key}={value}" for key, value in settings.items()]
        started = time.perf_counter()
        run_command(command, timeout)
        record.write_text(json.dumps({"wall_seconds": time.perf_counter() - started, "command": command}))
    results = json.loads((config.run_dir() / "results.json").read_text())
    return {**results, "wall_seconds": json.loads(record.read_text())["wall_seconds"],
            "run_dir": str(config.run_dir())}


def run_row(name: str, results: dict) -> dict:
    """One table row of a finished run: accuracies (validation, test, test with flip TTA) and times."""
    test, tta = results["test"], results["test"].get("flip_tta", {}).get("top1")
    return {"run": name, "backbone": results["backbone"], "image size": results["image_size"],
            "epochs": results["epochs_run"], "val top-1": f"{results['validation']['top1']:.1%}",
            "test top-1": f"{test['top1']:.1%}", "test top-1 flip TTA": "" if tta is None else f"{tta:.1%}",
            "wall min": results["wall_seconds"] / 60, "train images/s": results["train_images_per_second"],
            "outside steps s/epoch": results.get("seconds_outside_steps_per_epoch"),
            "head features s": results.get("head_feature_seconds")}


RUN_COLUMNS = ["run", "backbone", "image size", "epochs", "val top-1", "test top-1", "test top-1 flip TTA",
               "wall min", "train images/s", "outside steps s/epoch", "head features s"]
