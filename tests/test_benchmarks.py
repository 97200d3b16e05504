"""Each benchmark's quick mode runs and prints its table with the right columns (timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

slow = pytest.mark.slow  # each quick-table test runs a benchmark script in a subprocess


def table_of(script: str, *args: str) -> tuple[list[str], list[list[str]]]:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return parse_table(result.stdout)


def parse_table(printed: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert "machine:" in printed
    return header, rows


@slow
def test_upsampling_memory_quick_table():
    from benchmarks.upsampling_memory import COLUMNS

    header, rows = table_of("upsampling_memory.py", "--images", "1000")  # each size in a process of its own
    assert header == COLUMNS
    assert [row[0] for row in rows] == ["32", "96", "224"]
    assert all(float(row[5]) >= float(row[4]) > 0 for row in rows)


@slow
def test_throughput_quick_table(monkeypatch, capsys):
    """The script's quick table, with each measurement in this process (the script isolates each in its own
    for its thread settings; the memory benchmark above checks that path)."""
    from benchmarks import throughput

    monkeypatch.setattr(throughput, "run_isolated",
                        lambda script, arguments: throughput.measure(**json.loads(arguments[1])))
    assert throughput.main(["--quick", "--steps", "2"]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert header == throughput.COLUMNS
    assert [(row[2], row[3], row[4]) for row in rows] == [("mobilenetv3small", "32", "frozen"),
                                                          ("mobilenetv3small", "32", "finetune")]
    asked, in_force = header.index("XLA asked"), header.index("XLA in force")
    assert all(row[asked] == "auto" and row[in_force] in ("on", "off") for row in rows)


@slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_hard_examples_quick_table(tmp_path, monkeypatch, capsys):
    """Two of the four arms, each trained by the command line in this process (the script runs each in its own)."""
    from benchmarks import common, hard_examples
    from cifar100.__main__ import main

    commands = []

    def in_process(command, timeout):
        commands.append(command)
        assert command[1:3] == ["-m", "cifar100"] and main(command[3:]) == 0

    monkeypatch.setattr(common, "run_command", in_process)
    arms = ["uniform", "selective:0.33"]
    assert hard_examples.main(["--quick", "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
                               "--json", str(tmp_path / "runs.json"), "--arms", *arms]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert len(commands) == 2 and "--set=hem_mode=selective" in commands[1]
    assert header == hard_examples.COLUMNS
    assert [row[0] for row in rows] == arms
    assert (tmp_path / "fashion-mnist" / "DATASET.json").exists()
    runs = {run["arm"]: run for run in json.loads((tmp_path / "runs.json").read_text())}
    assert runs["uniform"]["backprop_fraction"] == 1.0 and 0.2 < runs["selective:0.33"]["backprop_fraction"] < 0.5
    assert all(len(run["val"]) == 2 and run["wall"][1] > run["wall"][0] > 0 for run in runs.values())


def test_hard_examples_summary_times_each_arm_to_uniforms_final_accuracy():
    from benchmarks.hard_examples import summarise, time_to

    def run(arm, seed, val, wall):
        return {"arm": arm, "seed": seed, "val": val, "wall": wall, "test": val[-1], "backprop_fraction": 1.0}

    runs = [run("uniform", 0, [0.5, 0.7, 0.8], [10, 20, 30]), run("uniform", 1, [0.6, 0.7, 0.9], [10, 20, 30]),
            run("fast", 0, [0.6, 0.8, 0.85], [6, 12, 18]), run("fast", 1, [0.7, 0.9, 0.9], [6, 12, 18]),
            run("never", 0, [0.1, 0.2, 0.3], [5, 6, 7]), run("never", 1, [0.1, 0.2, 0.3], [5, 6, 7])]
    assert time_to(runs[2], 0.8) == 12 and time_to(runs[4], 0.8) is None
    rows = {row["arm"]: row for row in summarise(runs, ["uniform", "fast", "never"])}
    assert rows["uniform"]["vs uniform's time"] == "1.00x"
    assert rows["fast"]["vs uniform's time"] == "0.40x"  # 12 s of 30 on each seed
    assert rows["fast"]["time to uniform's final val top-1"].startswith("0.20 min (2/2 seeds")
    assert rows["never"]["time to uniform's final val top-1"] == "not reached (0/2 seeds)"


def fake_results(size: int, top1: float, tta: float, seconds: float) -> dict:
    return {"backbone": "mobilenetv3small", "image_size": size, "epochs_run": 18, "validation": {"top1": top1 - 0.01},
            "test": {"top1": top1, "flip_tta": {"top1": tta}}, "wall_seconds": seconds,
            "train_images_per_second": 60.0, "seconds_outside_steps_per_epoch": 3.5, "head_feature_seconds": 70.0}


def test_run_rows_and_the_image_size_figure(tmp_path):
    from benchmarks.common import RUN_COLUMNS, run_row
    from benchmarks.image_size import draw

    rows = [run_row(f"{size} px", fake_results(size, top1, top1 + 0.005, 60 * minutes))
            for size, top1, minutes in ((32, 0.70, 4), (64, 0.80, 7), (128, 0.88, 18))]
    assert set(RUN_COLUMNS) <= set(rows[0])
    assert (rows[2]["test top-1"], rows[2]["test top-1 flip TTA"], rows[2]["val top-1"]) == ("88.0%", "88.5%", "87.0%")
    assert rows[1]["wall min"] == 7
    draw(rows, tmp_path / "curve.png", "title")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "curve.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_test_resolution_evaluates_the_checkpoint_at_each_size_and_the_test_set_only_when_asked(untrained_run,
                                                                                               capsys):
    from benchmarks import test_resolution
    from cifar100 import data, evaluate
    from cifar100.config import Config

    assert test_resolution.main([str(untrained_run), "--sizes", "32", "48", "--test", "48"]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert header == test_resolution.COLUMNS and [row[0] for row in rows] == ["32 px (trained)", "48 px"]
    config = Config.load(untrained_run / "config.json")
    splits = data.prepare_data(config)
    model = evaluate.load_checkpoint(untrained_run / "best.keras", config, 100)
    assert rows[0][1] == f"{evaluate.basic_metrics(model, splits.x_val, splits.y_val, 100)['top1']:.1%}"
    assert rows[0][4] == "" and rows[1][4].endswith("%")  # the test set once, at the size asked
