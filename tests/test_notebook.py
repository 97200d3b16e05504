import json
import os
import re
import subprocess
import sys

import nbformat
import pytest

from cifar100 import keras_internals, write_data

from .conftest import ROOT


def test_committed_notebook_has_no_outputs_and_one_parameters_cell():
    notebook = nbformat.read(ROOT / "main.ipynb", as_version=4)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code_cells)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "PRESET" in tagged[0].source and "HARD_EXAMPLE_MINING" in tagged[0].source


def test_the_cells_show_the_keras_recipe_and_check_the_parameters_without_a_line_of_their_own():
    """Each phase cell writes out its compile and fit (optimiser, loss, metrics, callbacks); the model cell
    shows the one definition of the model; the evaluation cell calls the model on the test set."""
    notebook = nbformat.read(ROOT / "main.ipynb", as_version=4)
    code = [c.source for c in notebook.cells if c.cell_type == "code"]
    phases = [source for source in code if "training.set_phase(" in source]
    assert len(phases) == 2
    for source in phases:
        for step in (".compile(", "optimizer=train.optimizer(", "loss=keras.losses.CategoricalCrossentropy(",
                     "metrics=[", ".fit(batches, validation_data=validation", "callbacks=", "training.end("):
            assert step in source, (step, source)
    model_cell = next(source for source in code if "models.new_model(" in source)
    assert "notebook.show_code(models.build_model" in model_cell
    assert any(".evaluate(dataset.x_test" in source for source in code)
    assert not any("params.check(" in source for source in code)  # notebook.guard_cells does it


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb")
    dataset = write_data.write_synthetic(folder / "cifar-100-python", n_train=1200, n_test=300)
    output = folder / "executed.ipynb"
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "main.ipynb"), str(output), "--cwd", str(ROOT),
         "-p", "PRESET", "smoke", "-p", "DATA_DIR", str(dataset), "-p", "RUN_NAME", "nbrun",
         "-p", "RUNS_DIR", str(folder / "models"), "-p", "DOWNLOAD", "False", "-p", "FINETUNE_EPOCHS", "2",
         "-p", "HARD_EXAMPLE_MINING", "True"],
        capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})  # the notebook's own default
    assert result.returncode == 0, result.stderr[-4000:]
    return nbformat.read(output, as_version=4), folder / "models" / "nbrun"


def cell_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_headless_and_leaves_figures_and_results(executed):
    _, run_dir = executed
    results = json.loads((run_dir / "results.json").read_text())
    assert {"top1", "top5", "per_class", "per_superclass", "most_confused"} <= set(results["test"])
    figures = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert {"training_curves", "superclass_confusion", "confused_pairs", "misclassified", "hardest_examples",
            "comparison"} <= figures


@pytest.mark.slow
def test_executed_notebook_says_the_data_is_synthetic_near_the_top_and_beside_accuracies(executed):
    notebook, _ = executed
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    data_cell = next(c for c in code_cells if "data.load(" in c.source)
    assert "SYNTHETIC DATA" in cell_text(data_cell)
    results_cell = next(c for c in code_cells if "test top-1 accuracy" in c.source)
    lines = [line for line in cell_text(results_cell).splitlines() if "accuracy" in line]
    assert lines and all("SYNTHETIC" in line for line in lines)


@pytest.mark.slow
def test_executed_notebook_shows_each_figure_once_and_no_tensorflow_log_line(executed):
    notebook, run_dir = executed
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    saved = {path.stem for path in (run_dir / "figures").glob("*.png")}
    assert saved == {"training_curves", "class_confusion", "per_class_accuracy", "superclass_confusion",
                     "confused_pairs", "misclassified", "hardest_examples", "comparison"}
    assert images == len(saved) + 3  # + the data cells' samples and class balance and the last cell's top-5
    streams = "".join(o.get("text", "") for o in outputs)
    assert not re.search(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", streams, re.MULTILINE), streams
    assert not any(keras_internals.NOISE.search(line) for line in streams.splitlines())


@pytest.mark.slow
def test_executed_notebook_shows_the_code_that_builds_the_model(executed):
    notebook, _ = executed
    model_cell = next(c for c in notebook.cells if c.cell_type == "code" and "notebook.show_code(" in c.source)
    shown = cell_text(model_cell)
    assert "def build_model(" in shown and 'keras.Input((32, 32, 3), dtype="uint8"' in shown
    assert "def augmentation_layers(" in shown and "layers.RandomFlip(" in shown


@pytest.mark.slow
def test_executed_notebook_ends_with_a_prediction_on_an_image_file_with_class_names(executed):
    notebook, run_dir = executed
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    assert "best(image[None])" in last.source and "evaluate.load_image(image_file)" in last.source
    names = json.loads((run_dir / "classes.json").read_text())["class_names"]
    printed = [line for line in cell_text(last).splitlines() if line.startswith("'")]
    assert len(printed) == 5 and all(line.rsplit(": ", 1)[0].strip("'") in names for line in printed)
    probabilities = [float(line.rsplit(": ", 1)[1]) for line in printed]
    assert probabilities == sorted(probabilities, reverse=True) and (run_dir / "test-image-0.png").is_file()


@pytest.mark.slow
def test_the_command_line_trains_the_model_the_notebook_trained(executed, capsys):
    """The same settings on the command line find the notebook's finished run: the same folder, and the model
    the command line builds has the fingerprint of the one the notebook trained (else a RunError)."""
    from cifar100 import run_folder
    from cifar100.__main__ import main

    _, run_dir = executed
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "" and run_folder.read_state(run_dir)["model_fingerprint"]
    history = (run_dir / "history.csv").read_bytes()
    assert main(["train", "--preset", "smoke", "--data", config["data_dir"], "--run-dir", str(run_dir),
                 "--set", "finetune_epochs=2", "--set", "hem=true"]) == 0
    assert "finished run found" in capsys.readouterr().out
    assert (run_dir / "history.csv").read_bytes() == history
