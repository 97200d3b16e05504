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
