"""main.ipynb as people use it: committed without outputs, run top to bottom headless (papermill), and driven
cell by cell in a real kernel, where a parameter changed after the settings cell is pointed out."""

import json

import pytest

from cifar100 import notebook
from tests.conftest import ROOT


def test_main_ipynb_is_committed_without_outputs():
    cells = json.loads(notebook.NOTEBOOK.read_text())["cells"]
    assert [c for c in cells if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])] == []
    assert any("parameters" in c["metadata"].get("tags", []) for c in cells)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_headless(synthetic_cifar100, tmp_path):
    import papermill

    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(notebook.NOTEBOOK), str(out), cwd=str(ROOT), kernel_name="python3",
                               progress_bar=False,
                               parameters={"PRESET": "smoke", "DATA_DIR": str(synthetic_cifar100), "DOWNLOAD": False,
                                           "RUNS_DIR": str(tmp_path / "models"), "VERBOSE": 0,
                                           "SETTINGS": {"max_train_images": 200, "finetune_epochs": 1}})
    cells = json.loads(out.read_text())["cells"]
    images = sum("image/png" in o.get("data", {}) for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    assert images >= 7  # samples, curves, confusion, per class, misclassified, hardest, comparison
    text = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    assert "SYNTHETIC data in the CIFAR-100 format, run smoke-" in text and "test top-1" in text
    assert len(list((tmp_path / "models").glob("smoke-*/figures/*.png"))) == 6


@pytest.mark.slow
def test_a_kernel_says_when_a_parameter_changed_after_the_settings_cell(synthetic_cifar100):
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        def run(code):
            outputs = []
            client.execute_interactive(code, timeout=120, output_hook=lambda m: outputs.append(
                m["content"].get("text", "") + m["content"].get("evalue", "")))
            return "".join(outputs)

        cells = [c for c in json.loads(notebook.NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
        run("".join(cells[0]["source"]) + f"\nPRESET = 'smoke'\nDATA_DIR = {str(synthetic_cifar100)!r}")
        assert "image_size = 32" in run("".join(cells[1]["source"]))
        assert "Parameters changed" not in run("x = 1")
        run("IMAGE_SIZE = 48")
        assert "Parameters changed since the settings cell ran: IMAGE_SIZE" in run("x = 2")
        assert "image_size = 48" in run("".join(cells[1]["source"]))
        assert "Parameters changed" not in run("x = 3")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
