"""The research loop in a real Jupyter kernel, cell by cell, as a person runs it: run all; change a
parameter and rerun; rerun unchanged; interrupt the training and rerun. Slow (a few small trainings)."""

import csv
import os
import re
import threading
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from cifar100 import keras_internals, write_data

from .conftest import ROOT

pytestmark = pytest.mark.slow
CPP_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)  # absl/glog format


class Kernel:
    """main.ipynb in one live kernel: cells run one by one, the parameters cell edited in between."""

    def __init__(self, notebook: nbformat.NotebookNode, environment: dict):
        self.notebook = notebook
        self.client = NotebookClient(notebook, timeout=600, kernel_name="python3", kernel_manager_class=KernelManager,
                                     resources={"metadata": {"path": str(ROOT)}})
        self.environment = environment
        self.outputs: list[list] = []  # every executed cell's outputs, for the log-line check

    def __enter__(self):
        self._setup = self.client.setup_kernel(env=self.environment)
        self._setup.__enter__()
        return self

    def __exit__(self, *exc):
        return self._setup.__exit__(*exc)

    def index(self, text: str) -> int:
        return next(i for i, c in enumerate(self.notebook.cells) if c.cell_type == "code" and text in c.source)

    def set_parameters(self, **values) -> None:
        cell = self.notebook.cells[self.index("HARD_EXAMPLE_MINING =")]
        for name, value in values.items():
            cell.source, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", cell.source, flags=re.MULTILINE)
            assert count == 1, name

    def run(self, index: int) -> nbformat.NotebookNode:
        cell = self.notebook.cells[index]
        try:
            self.client.execute_cell(cell, index)
        finally:
            self.outputs.append(list(cell.outputs))
        return cell

    def run_all(self, start: int = 0) -> list[nbformat.NotebookNode]:
        return [self.run(i) for i, c in enumerate(self.notebook.cells) if c.cell_type == "code" and i >= start]


def text(cell) -> str:
    parts = []
    for output in cell.outputs:
        parts.append(output.get("text", ""))
        parts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
        parts += output.get("traceback", [])
    return "".join(parts)


def images(cells) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)


def run_folders(runs: Path) -> set[str]:
    return {p.name for p in runs.iterdir() if p.is_dir()}


def epochs_in(history: Path) -> list[int]:
    if not history.exists():
        return []
    with open(history) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def interrupt_after_first_epoch(kernel: Kernel, runs: Path, known: set[str], done: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        new = run_folders(runs) - known if runs.exists() else set()
        if new and (runs / new.pop() / "backup" / "finetune" / "committed.json").exists():  # an epoch committed
            kernel.client.km.interrupt_kernel()
            done.append(True)
            return
        time.sleep(0.05)


@pytest.fixture
def kernel(tmp_path):
    dataset = write_data.write_synthetic(tmp_path / "cifar-100-python", n_train=1000, n_test=200)
    notebook = nbformat.read(ROOT / "main.ipynb", as_version=4)
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CIFAR100_TF_LOGS")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with Kernel(notebook, environment) as live:
        live.set_parameters(PRESET="smoke", DATA_DIR=str(dataset), RUNS_DIR=str(tmp_path / "models"),
                            DOWNLOAD=False, VERBOSE=2, FINETUNE_EPOCHS=2)
        yield live


def test_change_rerun_compare_reuse_and_resume_in_a_live_kernel(kernel, tmp_path):
    runs = tmp_path / "models"
    comparison = kernel.index("compare.group_runs")
    training = kernel.index("train.Training(")  # phase 1; phase 2 and the evaluation are the next code cell
    finetune = kernel.index('training.set_phase("finetune")')

    # 1. Run All: the preset's run, each figure shown once
    cells = kernel.run_all()
    first = run_folders(runs)
    assert len(first) == 1 and re.fullmatch(r"smoke-finetune_epochs=2-[0-9a-f]{6}", next(iter(first)))
    figures = {path.stem for path in (runs / next(iter(first)) / "figures").glob("*.png")}
    assert figures == {"training_curves", "class_confusion", "per_class_accuracy", "superclass_confusion",
                       "confused_pairs", "misclassified", "comparison"}  # mining off: no hardest examples
    assert images(cells) == len(figures) + 3  # + the data cells' samples and class balance and the last cell's top-5
    hardest = next(c for c in cells if 'params.figure("hardest_examples")' in c.source)
    assert "hard-example mining was off in this run" in text(hardest)

    # 2. Change a parameter and run only the training cell: refused in one line, naming the change
    kernel.set_parameters(HARD_EXAMPLE_MINING=True)
    kernel.run(kernel.index("HARD_EXAMPLE_MINING ="))
    with pytest.raises(CellExecutionError):
        kernel.run(training)
    error = [o for o in kernel.notebook.cells[training].outputs if o.output_type == "error"]
    assert len(error) == 1 and len(error[0].traceback) == 1
    assert "error: the parameters changed since the settings were built (HARD_EXAMPLE_MINING: None -> True)" \
        in error[0].traceback[0] and "run the settings cell" in error[0].traceback[0]
    assert run_folders(runs) == first

    # 3. Run All: a new run folder, trained with mining on
    cells = kernel.run_all()
    (mining_on,) = run_folders(runs) - first
    assert mining_on.startswith("smoke-finetune_epochs=2-hem=True-")
    assert '"hem": true' in (runs / mining_on / "config.json").read_text()
    assert images(cells) == len(figures) + 3 + 1  # and the hardest-examples figure

    # 4. A value in SETTINGS, Run All: another folder; the comparison names what differs for all three
    kernel.set_parameters(SETTINGS={"head_learning_rate": 0.01})
    cells = kernel.run_all()
    (rate,) = run_folders(runs) - first - {mining_on}
    assert "head_learning_rate=0.01" in rate
    assert '"head_learning_rate": 0.01' in (runs / rate / "config.json").read_text()
    table = text(kernel.notebook.cells[comparison])
    assert ": 3 run(s)" in table
    for label in ("head_learning_rate=0.003, hem=False", "head_learning_rate=0.003, hem=True",
                  "* head_learning_rate=0.01, hem=True"):
        assert label in table, table

    # 5. Rerun unchanged: nothing trains, the finished run is shown
    history = (runs / rate / "history.csv").stat().st_mtime_ns
    cells = kernel.run_all()
    assert "finished run found" in text(kernel.notebook.cells[training])
    assert "phase 'finetune': nothing to train, the run is finished" in text(kernel.notebook.cells[finetune])
    assert "Epoch" not in text(kernel.notebook.cells[training]) + text(kernel.notebook.cells[finetune])
    assert (runs / rate / "history.csv").stat().st_mtime_ns == history
    assert images(cells) == len(figures) + 3 + 1 and len(run_folders(runs)) == 3

    # 6. New settings, interrupted while fine-tuning, then that cell again: it resumes
    kernel.set_parameters(SETTINGS={"head_learning_rate": 0.01, "seed": 1}, FINETUNE_EPOCHS=3)
    known, interrupted = run_folders(runs), []
    for index in range(finetune):
        if kernel.notebook.cells[index].cell_type == "code":
            kernel.run(index)
    watcher = threading.Thread(target=interrupt_after_first_epoch, args=(kernel, runs, known, interrupted))
    watcher.start()
    with pytest.raises(CellExecutionError):
        kernel.run(finetune)
    watcher.join()
    assert interrupted
    (resumed,) = run_folders(runs) - known
    stopped_at = epochs_in(runs / resumed / "history.csv")
    assert 1 <= len(stopped_at) < 3 and not (runs / resumed / "results.json").exists()
    assert "interrupted" in text(kernel.notebook.cells[finetune])
    cells = kernel.run_all(start=finetune)
    resumed_text = text(kernel.notebook.cells[finetune])
    assert re.search(r"resuming phase 'finetune' after epoch [12] \(of epochs 1-3\)", resumed_text), resumed_text
    assert "Epoch 1/3" not in resumed_text and "Warning" not in resumed_text
    assert epochs_in(runs / resumed / "history.csv") == [1, 2, 3]  # random weights: no head phase

    # 7. The compile edited in the fine-tuning cell (not in the settings): refused in one line, nothing trained
    kernel.set_parameters(SETTINGS={"seed": 2})
    for index in range(finetune):
        if kernel.notebook.cells[index].cell_type == "code":
            kernel.run(index)
    cell = kernel.notebook.cells[finetune]
    cell.source, count = re.subn(r"optimizer=train\.optimizer\(config, .*\),\n",
                                 "optimizer=keras.optimizers.SGD(0.01),\n", cell.source)
    assert count == 1
    with pytest.raises(CellExecutionError):
        kernel.run(finetune)
    error = [o for o in cell.outputs if o.output_type == "error"]
    assert len(error) == 1 and len(error[0].traceback) == 1
    assert "compiled otherwise than the settings say (optimizer: SGD (settings: Adam)" in error[0].traceback[0]
    (edited,) = run_folders(runs) - known - {resumed}
    assert not (runs / edited / "history.csv").exists()

    # No TensorFlow C++ log line in any output of the whole session
    streams = "".join(o.get("text", "") for outputs in kernel.outputs for o in outputs)
    assert not CPP_LOG_LINE.search(streams)
    assert not any(keras_internals.NOISE.search(line) for line in streams.splitlines())
