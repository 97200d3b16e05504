"""Each benchmark's quick mode runs and prints its table with the right columns (timings are not checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow  # each runs a benchmark script in a subprocess


def table_of(script: str, *args: str) -> tuple[list[str], list[list[str]]]:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert "machine:" in result.stdout
    return header, rows


def test_upsampling_memory_quick_table():
    from benchmarks.upsampling_memory import COLUMNS

    header, rows = table_of("upsampling_memory.py")
    assert header == COLUMNS
    assert [row[0] for row in rows] == ["32", "96", "224"]
    assert all(float(row[5]) >= float(row[4]) > 0 for row in rows)


def test_throughput_quick_table():
    from benchmarks.throughput import COLUMNS

    header, rows = table_of("throughput.py")
    assert header == COLUMNS
    assert [(row[2], row[3], row[4]) for row in rows] == [("mobilenetv3small", "32", "frozen"),
                                                          ("mobilenetv3small", "32", "finetune")]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_hard_examples_quick_table(tmp_path):
    from benchmarks.hard_examples import COLUMNS

    header, rows = table_of("hard_examples.py", "--data-dir", str(tmp_path / "fashion"))
    assert header == COLUMNS
    assert [row[0] for row in rows] == ["uniform", "hem"]
    assert (tmp_path / "fashion" / "DATASET.json").exists()
