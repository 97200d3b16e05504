"""tf.distribute: the notebook's recipe on two logical CPUs (MirroredStrategy) and as two workers on loopback
(MultiWorkerMirroredStrategy), each in processes of its own (devices and collective ops are set up before
TensorFlow starts); and the JAX backend."""

import json
import os
import socket
import subprocess
import sys

import pytest

from cifar100 import data

from .conftest import ROOT

ON_TWO_CPUS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cifar100 import notebook
found = notebook.run({"PRESET": "smoke", "DATA_DIR": sys.argv[1], "RUNS_DIR": sys.argv[2], "VERBOSE": 0,
                      "DOWNLOAD": False, "SETTINGS": json.loads(sys.argv[3])})
print(found["strategy"].num_replicas_in_sync, found["results"]["test"]["top1"])
"""
SMALL = {"finetune_epochs": 0}  # phase 1 (the backbone frozen) and the evaluation: the strategy at work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """SYNTHETIC data in the CIFAR-10 format: 300 training and 100 test images."""
    return data.write_synthetic(tmp_path_factory.mktemp("tiny") / "cifar-10", "cifar10", n_train=300, n_test=100)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_trains_the_recipe(tiny, tmp_path):
    done = subprocess.run([sys.executable, "-c", ON_TWO_CPUS, str(tiny), str(tmp_path),
                           json.dumps({**SMALL, "distribution": "mirrored"})], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    replicas, top1 = done.stdout.split()[-2:]
    assert replicas == "2" and 0 <= float(top1) <= 1
    assert [p.name for p in tmp_path.glob("*/best.keras")] == ["best.keras"]


@pytest.mark.slow
def test_two_workers_train_one_run_and_only_the_chief_writes_it(tiny, tmp_path):
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    workers = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    command = [sys.executable, "-m", "cifar100", "train", "--preset", "smoke", "--data", str(tiny),
               "--set", f"runs_dir={tmp_path}", "--set", "distribution=multi-worker",
               *[f"--set={k}={v}" for k, v in SMALL.items()]]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                                              "task": {"type": "worker", "index": i}})})
                 for i in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert len(list(tmp_path.glob("*/results.json"))) == 1  # the chief's; worker 1 wrote to a temporary folder


@pytest.mark.slow
def test_the_recipe_runs_on_the_jax_backend(tiny, tmp_path):
    command = [sys.executable, "-m", "cifar100", "train", "--preset", "smoke", "--data", str(tiny), "--set",
               f"runs_dir={tmp_path}", "--set", "finetune_epochs=0"]  # phase 1 and the evaluation
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("*/results.json")).read_text())
    assert results["epochs"] == 1 and 0 <= results["test"]["top1"] <= 1
