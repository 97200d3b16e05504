"""The model and the training step run under KERAS_BACKEND=jax too (a GPU machine may have JAX but no
TensorFlow), so throughput can be measured there with the same code."""

import json
import os
import subprocess
import sys

import pytest

from cifar100 import write_data

from .conftest import ROOT

TRAIN_ON_JAX = """
import importlib.abc, json, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    \"\"\"As on a GPU machine without TensorFlow: importing it fails.\"\"\"

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("tensorflow is not installed here")

sys.meta_path.insert(0, NoTensorFlow())
import keras
from cifar100 import train
from cifar100.config import ConfigError, make_config
settings = json.loads(sys.argv[1])
run_dir = train.run(make_config("smoke", settings), verbose=0)
results = json.loads((run_dir / "results.json").read_text())
try:  # selective backprop needs TensorFlow
    train.run(make_config("smoke", {**settings, "name": "jax-selective", "hem_mode": "selective"}), verbose=0)
    refused = None
except ConfigError as exc:
    refused = str(exc)
print(json.dumps({"backend": keras.backend.backend(), "top1": results["test"]["top1"], "selective": refused}))
"""


@pytest.mark.slow
def test_smoke_run_trains_on_the_jax_backend(tmp_path):
    dataset = write_data.write_synthetic(tmp_path / "cifar-10", kind="cifar10", n_train=1000, n_test=500)
    settings = {"data_dir": str(dataset), "runs_dir": str(tmp_path), "name": "jax", "hem": True}  # reweight mining
    result = subprocess.run([sys.executable, "-c", TRAIN_ON_JAX, json.dumps(settings)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["backend"] == "jax"
    assert outcome["top1"] > 0.3  # chance is 0.1
    # selective backprop needs TensorFlow: refused before anything is written
    assert "'selective' needs Keras' TensorFlow backend" in outcome["selective"]
    assert not (tmp_path / "jax-selective").exists()
