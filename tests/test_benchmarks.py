"""The memory benchmark's --quick runs in a subprocess and prints its table: the header's columns, numbers that parse
(timings are never checked)."""

import subprocess
import sys

import pytest

from .conftest import ROOT


def quick_table(script: str, *args: str) -> tuple[str, list[str], list[list[str]]]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    assert len(cells) >= 3 and set("".join(cells[1])) <= set("-")
    return done.stdout, cells[0], cells[2:]


@pytest.mark.slow
def test_upsampling_memory_quick_table():
    from benchmarks.upsampling_memory import COLUMNS

    _, header, rows = quick_table("upsampling_memory.py")
    assert header == COLUMNS and header[:3] == ["N", "S", "materialised GiB (computed)"]
    assert [row[:3] for row in rows] == [["2000", "96", f"{2000 * 96 * 96 * 3 * 4 / 2**30:.3f}"]]
    assert all(float(cell) > 0 for cell in rows[0][3:])
