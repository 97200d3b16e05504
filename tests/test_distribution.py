"""tf.distribute: MirroredStrategy over two logical CPUs, a two-worker run on loopback, TF_CONFIG errors.

A training on two devices runs in a process of its own: logical devices and collective ops must be set up
before TensorFlow starts, which has already happened in the pytest process.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cifar100 import write_data
from cifar100.config import ConfigError
from cifar100.distribution import read_tf_config, scaled_learning_rate

from .conftest import ROOT

TRAIN_ON_LOGICAL_CPUS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(sys.argv[2]))
from cifar100 import train
from cifar100.config import make_config
run_dir = train.run(make_config("smoke", json.loads(sys.argv[1])), verbose=0)
print(json.dumps(json.loads((run_dir / "results.json").read_text())["test"]))
"""


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory):
    # 10 classes: the smoke preset converges there (seed-to-seed spread of test top-1 about 0.02), so a
    # difference between strategies shows; on 100 classes, five epochs leave seeds 0.2 apart.
    return write_data.write_synthetic(tmp_path_factory.mktemp("dist") / "cifar-10", kind="cifar10", n_train=2000,
                                n_test=1000)


def train_on_cpus(settings: dict, devices: int) -> dict:
    result = subprocess.run([sys.executable, "-c", TRAIN_ON_LOGICAL_CPUS, json.dumps(settings), str(devices)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stdout": result.stdout}


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_one_device(dist_data, tmp_path):
    common = {"data_dir": str(dist_data), "runs_dir": str(tmp_path), "augment": "none"}
    two = train_on_cpus({**common, "name": "two", "distribution": "mirrored"}, devices=2)
    assert " on 2 replicas" in two["stdout"]  # two devices really trained
    # one device, in this process
    from cifar100 import train
    from cifar100.config import make_config

    run_dir = train.run(make_config("smoke", {**common, "name": "one", "distribution": "none"}), verbose=0)
    one = json.loads((run_dir / "results.json").read_text())["test"]
    assert two["top1"] > 0.5  # it learns (chance is 0.1)
    # Same data, global batch and learning rate; float sums in another order make the runs drift a little.
    assert abs(two["top1"] - one["top1"]) <= 0.05, (one, two)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_command(dist_data, run_dir, *extra):
    return [sys.executable, "-m", "cifar100", "train", "--preset", "smoke", "--data", str(dist_data),
            "--run-dir", str(run_dir), "--set", "distribution=multi-worker", "--set", "distribution_timeout=60",
            "--verbose", "2", *extra]


def test_unreachable_worker_fails_with_a_clear_message(dist_data, tmp_path, monkeypatch, capsys):
    from cifar100.__main__ import main

    ports = free_ports(2)  # nobody listens on the second port
    monkeypatch.setenv("TF_CONFIG", tf_config(ports, 0))
    started = time.monotonic()
    assert main(worker_command(dist_data, tmp_path / "run", "--set", "distribution_timeout=1")[3:]) == 2
    assert time.monotonic() - started < 30
    assert f"worker 1 at 127.0.0.1:{ports[1]} (from TF_CONFIG) did not answer within 1 s" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [
    ("{oops", "TF_CONFIG environment variable is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "needs 'cluster'"),
    ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "is not host:port"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "index below 1"),
])
def test_malformed_tf_config_is_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        read_tf_config(text)


def test_malformed_tf_config_fails_the_command_at_once(dist_data, tmp_path, monkeypatch, capsys):
    from cifar100.__main__ import main

    monkeypatch.setenv("TF_CONFIG", "{oops")
    assert main(worker_command(dist_data, tmp_path / "run")[3:]) == 2  # in process: refused before any strategy
    assert "TF_CONFIG environment variable is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_learning_rate_follows_the_linear_scaling_rule():
    assert scaled_learning_rate(1e-3, 256, 64) == pytest.approx(4e-3)
    assert scaled_learning_rate(1e-3, 256, None) == 1e-3


def epochs_in(history) -> list[int]:
    lines = history.read_text().splitlines()[1:] if history.exists() else []
    return [int(line.split(",", 1)[0]) for line in lines]


@pytest.mark.slow
def test_a_multi_worker_run_resumes_after_a_worker_is_restarted_and_only_the_chief_writes(dist_data, tmp_path):
    """The real two-worker cluster on loopback, once: stopped when a worker dies, restarted, completed."""
    run_dir = tmp_path / "runs" / "restart"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ports = free_ports(2)
    command = worker_command(dist_data, run_dir, "--set", "finetune_epochs=5",  # random weights: no head phase
                             "--set", "distribution_timeout=20")

    def start(index):
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "TF_CONFIG": tf_config(ports, index), "TMPDIR": str(scratch),
                                     "TF_CPP_MIN_LOG_LEVEL": "2"})

    chief, other = start(0), start(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and chief.poll() is None and not epochs_in(run_dir / "history.csv"):
        time.sleep(0.1)
    other.kill()  # one worker dies: the chief's collective ops time out, and it stops too
    other.wait()
    try:
        chief.wait(timeout=180)
    finally:
        chief.kill()
    assert chief.returncode != 0, "the chief finished without its peer"
    assert 1 <= len(epochs_in(run_dir / "history.csv")) < 5

    killed_leftovers = set(scratch.iterdir())  # the killed worker could not remove its temporary folder
    restarted = [start(0), start(1)]  # the whole job restarts, with the same TF_CONFIG
    try:
        outputs = [w.communicate(timeout=600)[0] for w in restarted]
    finally:
        for w in restarted:
            w.kill()
    assert [w.returncode for w in restarted] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "resuming run" in outputs[0]
    assert epochs_in(run_dir / "history.csv") == list(range(1, 6))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 5 and results["test"]["top1"] > 0.5  # chance is 0.1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["restart"]  # only the chief's folder
    assert set(scratch.iterdir()) == killed_leftovers  # the restarted worker's temporary folder is gone
