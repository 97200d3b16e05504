"""Training on one device, on all GPUs of a machine, or across machines, with tf.distribute.

    auto          MirroredStrategy when more than one GPU is visible, else the default (one device)
    mirrored      MirroredStrategy over all GPUs (or, without GPUs, over all logical CPU devices)
    multi-worker  MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG environment variable
    none          the default strategy

The config's batch_size is the global batch (split across replicas). Only the chief (worker 0) writes the run
folder; the other workers write to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cifar100 import keras_internals
from cifar100.config import DISTRIBUTIONS, ConfigError


@dataclass(frozen=True)
class Cluster:
    """This process's place in a TF_CONFIG cluster."""

    workers: tuple[str, ...]
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def read_tf_config(text: str | None = None) -> Cluster:
    """Parse TF_CONFIG (worker-only clusters: worker 0 is the chief), with clear errors."""
    text = os.environ.get("TF_CONFIG") if text is None else text
    where = "the TF_CONFIG environment variable"
    if not text:
        raise ConfigError(f"setting 'distribution': multi-worker needs {where}, e.g. "
                          '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                          '"task": {"type": "worker", "index": 0}}')
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc}): {text[:200]!r}") from None
    try:
        workers = tuple(spec["cluster"]["worker"])
        task = spec["task"]
        index = int(task["index"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where} needs 'cluster': {{'worker': [host:port, ...]}} and 'task': "
                          f"{{'type': 'worker', 'index': N}}; found {text[:200]!r}") from None
    if set(spec["cluster"]) - {"worker"}:
        raise ConfigError(f"{where}: only 'worker' jobs are supported (worker 0 is the chief); found "
                          f"{sorted(spec['cluster'])}")
    if task.get("type") != "worker" or not 0 <= index < len(workers):
        raise ConfigError(f"{where}: task must be a worker with an index below {len(workers)}; found {task}")
    for address in workers:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{where}: worker address {address!r} is not host:port")
    return Cluster(workers, index)


def silent_workers(cluster: Cluster) -> list[str]:
    """The other workers whose address accepts no connection now."""
    silent = []
    for index, address in enumerate(cluster.workers):
        if index == cluster.index:
            continue
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                pass
        except OSError:
            silent.append(f"worker {index} at {address}")
    return silent


def rendezvous(cluster: Cluster, timeout: float) -> None:
    """Wait at most `timeout` seconds, before TensorFlow starts, until every worker's TF_CONFIG port answers (this
    one's listens meanwhile, then is freed for TensorFlow): MultiWorkerMirroredStrategy would hang on a missing one."""
    port = cluster.workers[cluster.index].rpartition(":")[2]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", int(port)))
    except OSError as exc:
        listener.close()
        raise ConfigError(f"worker {cluster.index} cannot listen on its TF_CONFIG port {port} ({exc}); "
                          "is another process using it?") from None
    listener.listen(16)
    listener.settimeout(0.2)
    done = threading.Event()

    def answer():
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:  # let the caller close first, so no TIME_WAIT is left on this port
                connection.settimeout(2)
                try:
                    while connection.recv(64):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while silent := silent_workers(cluster):
            if time.monotonic() > deadline:
                raise ConfigError(f"{', '.join(silent)} (from TF_CONFIG) did not answer within {timeout:.0f} s. "
                                  "Start every worker of the cluster with the same command and its own task "
                                  "index, and check the addresses and firewalls.")
            time.sleep(0.5)
    finally:
        done.set()
        thread.join()
        listener.close()


class NoStrategy:
    """One device: stands in for tf.distribute's default strategy (and on backends other than TensorFlow)."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(distribution: str, timeout: float = 300.0):
    """The tf.distribute strategy for a `distribution` setting, and the Cluster (None outside multi-worker)."""
    import keras

    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"setting 'distribution': {distribution!r} is not one of {list(DISTRIBUTIONS)}")
    if keras.backend.backend() != "tensorflow":
        if distribution in ("auto", "none"):
            return NoStrategy(), None
        raise ConfigError(f"setting 'distribution': {distribution!r} uses tf.distribute and needs the TensorFlow "
                          f"backend; this process runs Keras on {keras.backend.backend()!r}")
    import tensorflow as tf

    if distribution == "multi-worker":
        # before anything else touches TensorFlow's runtime: collective ops are set up at its start
        cluster = read_tf_config()
        rendezvous(cluster, timeout)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        keras_internals.reduce_structures_one_by_one(strategy)
        return strategy, cluster
    gpus = tf.config.list_logical_devices("GPU")
    if distribution == "none" or (distribution == "auto" and len(gpus) < 2):
        return NoStrategy(), None
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices), None


def is_distributed(strategy) -> bool:
    """True for a tf.distribute strategy (even of one replica): its model must be built inside its scope."""
    return not isinstance(strategy, NoStrategy)


RESUME_FILES = ("config.json", "state.json", "phase1.weights.h5", "history.csv", "best.keras", "backup")


def worker_folder(chief_dir: Path, index: int) -> Path:
    """A temporary run folder for a non-chief worker, seeded with the chief's resume state (when every worker sees
    the run folder), so that all workers resume from the same epoch."""
    folder = Path(tempfile.mkdtemp(prefix=f"cifar100-worker{index}-"))
    for name in RESUME_FILES:
        source = Path(chief_dir) / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        elif source.is_file():
            shutil.copy2(source, folder / name)
    return folder


def scaled_learning_rate(learning_rate: float, batch_size: int, reference_batch_size: int | None) -> float:
    """Linear scaling (Goyal et al., 2017): rates suit `reference_batch_size`; k times the batch: k times the rate."""
    if not reference_batch_size:
        return learning_rate
    return learning_rate * batch_size / reference_batch_size
