"""Hard-example mining: the reweight mode (a scoring pass sets loss weights) and the selective mode
(each step backpropagates only the high-loss examples), tested through Keras' own fit()."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from cifar100.batches import EpochOrder, TrainBatches, one_hot
from cifar100.mining import HardExampleMining, SelectiveBackprop, log_keys, mining_weights, per_example_cross_entropy

from .conftest import ROOT

CLASSES = 4


def separable(n=256, seed=0):
    """Images whose red channel tells the class (a linear model learns it), with noise elsewhere."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (labels * 60)[:, None, None].astype(np.uint8)
    return images, labels


def linear_model():
    model = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(CLASSES, activation="softmax")])
    model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
    return model


class RecordingBatches(TrainBatches):
    """Records the loss weights of every batch that Keras reads, by epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list] = {}

    def __getitem__(self, index):
        batch = super().__getitem__(index)
        self.seen.setdefault(self.epoch, []).append(batch[2])
        return batch


def test_mining_weights_favour_high_loss_keep_the_floor_and_average_one():
    losses = np.array([0.1, 0.5, 1.0, 4.0])
    weights = mining_weights(losses, strength=1.0, floor=0.5)
    assert np.isclose(weights.mean(), 1.0) and np.all(np.diff(weights) > 0)
    assert weights.min() >= 0.5
    np.testing.assert_allclose(mining_weights(losses, strength=0.0, floor=0.5), 1.0)


def test_reweighting_takes_effect_in_the_very_next_epoch_through_fit():
    """Keras reads an epoch's batches after the callbacks' on_epoch_end of the epoch before."""
    keras.utils.set_random_seed(0)
    images, labels = separable()
    sampler = RecordingBatches(images, labels, CLASSES, 32, seed=0, weighted=True)
    mining = HardExampleMining(sampler, fraction=1.0, strength=2.0, floor=0.2)
    set_after = {}
    remember = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: set_after.update({epoch: sampler.weights.copy()}))
    model = linear_model()
    history = model.fit(sampler, epochs=3, shuffle=False, verbose=0,
                        callbacks=[EpochOrder(sampler), mining, remember])
    assert all(np.all(w == 1) for w in sampler.seen[0])  # nothing scored before epoch 0
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        expected = set_after[epoch - 1][sampler.order]  # what mining set at the end of the epoch before
        np.testing.assert_allclose(np.concatenate(sampler.seen[epoch][-len(sampler):]), expected)
    assert history.history["examples_forward"] == [256] * 3 and history.history["backprop_fraction"] == [1.0] * 3


def test_reweighting_gives_the_hardest_examples_the_largest_weights():
    keras.utils.set_random_seed(0)
    images, labels = separable()
    sampler = TrainBatches(images, labels, CLASSES, 32, weighted=True)
    model = linear_model()
    mining = HardExampleMining(sampler, every=2, fraction=0.5, strength=2.0, floor=0.3)
    mining.set_model(model)
    logs = {}
    mining.on_epoch_end(0, logs)  # not a scoring epoch (every 2)
    assert logs["examples_forward"] == 0 and sampler.weights is None
    mining.on_epoch_end(1, logs)
    assert logs["examples_forward"] == 128 and np.sum(~np.isnan(mining.losses)) == 128
    scored = ~np.isnan(mining.losses)
    losses = per_example_cross_entropy(model, images, labels)
    hardest = np.argsort(-np.where(scored, losses, -1))[:10]
    assert np.all(sampler.weights[hardest] > 1) and sampler.weights.min() >= 0.3
    assert np.isclose(sampler.weights.mean(), 1.0, atol=1e-5)


def test_selection_keeps_losses_above_the_recent_window_and_drops_those_below():
    model = linear_model()
    mining = SelectiveBackprop(selectivity=0.5, window=64)
    mining.make_state(model)
    mining.window.assign(np.linspace(1.0, 2.0, 64).astype("float32"))
    mining.seen.assign(64)
    import tensorflow as tf

    losses = tf.constant([0.5, 0.9, 2.5, 3.0, 0.1], tf.float32)  # below, below, above, above, below
    for step in range(20):
        keep = mining._select(tf, losses, tf.constant(step)).numpy()
        np.testing.assert_array_equal(keep, [False, False, True, True, False])
    median = tf.fill([2000], 1.5)  # percentile 0.5, beta 1: kept half the time
    kept = mining._select(tf, tf.concat([median, [9.0]], 0), tf.constant(0)).numpy()[:-1]
    assert 0.45 < kept.mean() < 0.55


def fit_selective(selectivity=0.3, epochs=3):
    keras.utils.set_random_seed(0)
    images, labels = separable(512)
    sampler = TrainBatches(images, labels, CLASSES, 64, seed=0)
    model = linear_model()
    before = model.get_weights()
    mining = SelectiveBackprop(selectivity, window=256)
    history = model.fit(sampler, epochs=epochs, shuffle=False, verbose=0, callbacks=[EpochOrder(sampler), mining])
    return model, before, history.history, mining


def test_selective_backprop_trains_on_a_fraction_and_logs_what_it_did():
    model, before, history, mining = fit_selective(selectivity=0.3)
    assert history["examples_forward"] == [512] * 3
    assert all(60 < n < 250 for n in history["examples_backprop"]), history["examples_backprop"]  # ~0.3 of 512
    assert all(s > 0 for s in history["forward_seconds"] + history["backprop_seconds"])
    assert all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    assert history["scored_accuracy"][-1] > 0.6  # over every example, in inference mode; chance is 0.25
    # loss and accuracy are the training pass's, over the kept examples: the hard ones
    assert all(k > s for k, s in zip(history["loss"], history["scored_loss"], strict=True))
    assert all(k < s for k, s in zip(history["accuracy"], history["scored_accuracy"], strict=True))
    assert "train_step" not in vars(model)  # the model's own step is back after fit
    state = mining.get_state()
    assert state["seen"] == 3 * 512 and len(state["window"]) == 256


def batchnorm_model():
    """Dense -> BatchNormalization -> softmax: BatchNorm normalises by the batch's statistics in training mode
    and by its moving ones (at first mean 0, variance 1) in inference mode, so the two modes predict apart."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.Dense(CLASSES, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy", metrics=["accuracy"])
    return model


def test_selective_backprop_logs_the_training_pass_as_loss_and_the_scoring_pass_apart():
    """`loss` and `accuracy` are the training pass's (training mode, the kept examples), as in the other
    modes; `scored_loss` and `scored_accuracy` the scoring pass's (inference mode, the whole batch)."""
    keras.utils.set_random_seed(0)
    x = (np.random.default_rng(0).normal(size=(64, 4)) + 10).astype("float32")  # far from the moving mean 0
    y = one_hot(np.arange(64) % CLASSES, CLASSES)
    model = batchnorm_model()
    twin = keras.models.clone_model(model)  # a call in training mode moves BatchNorm's statistics: not the model's
    twin.set_weights(model.get_weights())
    scores = twin(x, training=False)  # before the training-mode call, which moves the twin's statistics
    predictions = twin(x, training=True)
    expected = {"loss": keras.losses.CategoricalCrossentropy()(y, predictions),
                "accuracy": keras.metrics.CategoricalAccuracy()(y, predictions),
                "scored_loss": keras.ops.mean(keras.losses.categorical_crossentropy(y, scores)),
                "scored_accuracy": keras.metrics.CategoricalAccuracy()(y, scores)}
    expected = {key: float(keras.ops.convert_to_numpy(value)) for key, value in expected.items()}
    assert abs(expected["loss"] - expected["scored_loss"]) > 1.0  # the two passes differ clearly
    history = model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0,
                        callbacks=[SelectiveBackprop(selectivity=1.0, window=64)]).history
    assert history["examples_forward"] == [64] and history["examples_backprop"] == [64]  # every example kept
    for key, value in expected.items():
        assert history[key][0] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_selective_backprop_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, before, history, _ = fit_selective(selectivity=0.5, epochs=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[-1].compute_dtype == policy.split("_")[1]
    if policy == "mixed_float16":  # Keras wraps the optimizer to scale the loss; the step scales it too
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(np.isfinite(history["loss"])) and sum(history["examples_backprop"]) < 2 * 512
    assert not np.allclose(model.get_weights()[0], before[0])


def test_selective_backprop_scales_the_loss_under_float16():
    """Under mixed_float16 Keras' LossScaleOptimizer divides the gradients by its loss scale (2 ** 15 at first),
    so the step must multiply the loss by it. SGD, whose update is proportional to the gradient, shows it
    (Adam's update hardly depends on the gradient's scale): the same steps move the weights as far as float32."""
    moved = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            images, labels = separable(512)
            sampler = TrainBatches(images, labels, CLASSES, 64, seed=0)
            model = linear_model()
            model.compile(keras.optimizers.SGD(0.05), "categorical_crossentropy")
            before = model.get_weights()[0]
            model.fit(sampler, epochs=1, shuffle=False, verbose=0,
                      callbacks=[EpochOrder(sampler), SelectiveBackprop(1.0, window=256)])
            moved[policy] = float(np.abs(model.get_weights()[0] - before).sum())
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert moved["float32"] > 0 and 0.4 < moved["mixed_float16"] / moved["float32"] < 2.5, moved


SELECTIVE_ON_TWO_CPUS = """
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from tests.test_mining import separable, linear_model, CLASSES
from cifar100.mining import SelectiveBackprop
from cifar100.batches import EpochOrder, TrainBatches
strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    model = linear_model()
images, labels = separable(512)
sampler = TrainBatches(images, labels, CLASSES, 64, seed=0)
history = model.fit(sampler, epochs=2, shuffle=False, verbose=0,
                    callbacks=[EpochOrder(sampler), SelectiveBackprop(0.3, 256)]).history
with strategy.scope():  # every example kept: the training pass's loss is the scoring pass's (no dropout here)
    model = linear_model()
every = model.fit(sampler, epochs=1, shuffle=False, verbose=0, callbacks=[SelectiveBackprop(1.0, 256)]).history
print(json.dumps({"replicas": strategy.num_replicas_in_sync, **history,
                  "every_loss": every["loss"], "every_scored_loss": every["scored_loss"]}))
"""


@pytest.mark.slow
def test_selective_backprop_under_a_mirrored_strategy_of_two_replicas():
    result = subprocess.run([sys.executable, "-c", SELECTIVE_ON_TWO_CPUS], capture_output=True, text=True,
                            cwd=ROOT, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads(result.stdout.strip().splitlines()[-1])
    assert history["replicas"] == 2
    assert history["examples_forward"] == [512, 512]  # each replica's half of every batch, summed
    assert all(60 < n < 250 for n in history["examples_backprop"])
    assert np.isfinite(history["loss"]).all() and history["scored_accuracy"][-1] > 0.4
    # the loss of the replicas' training passes, each replica's share of the batch counted once
    assert history["every_loss"] == pytest.approx(history["every_scored_loss"], rel=1e-4)


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
@pytest.mark.parametrize("head_features", ["live", "cached"])
def test_a_selective_run_mines_in_both_phases_and_records_it(synthetic_cifar100, tmp_path, head_features):
    """With phase 1 on cached features, mining does not run there and fills its columns (history.csv keeps
    the columns of its first epoch)."""
    from cifar100 import models, train
    from cifar100.config import make_config
    from cifar100.run_folder import history_rows

    weights = tmp_path / "tinycnn.weights.h5"  # given weights count as pretrained: the head phase runs
    models.tiny_cnn().save_weights(weights)
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100), "runs_dir": str(tmp_path),
                                   "weights": str(weights), "head_epochs": 1, "finetune_epochs": 1, "hem": True,
                                   "hem_mode": "selective", "head_features": head_features,
                                   "hem_selectivity": 0.4})
    run_dir = train.run(config, verbose=0)
    rows = history_rows(run_dir)
    assert len(rows) == 2  # one epoch of each phase
    assert set(log_keys(config)) <= set(rows[0])  # the header's columns, every row's
    if head_features == "cached":
        assert int(rows[0]["examples_forward"]) == 0 and math.isnan(float(rows[0]["scored_loss"]))
    for row in rows if head_features == "live" else rows[1:]:
        assert int(row["examples_forward"]) == 900  # 1,000 images less the validation split, every one scored
        assert 200 < int(row["examples_backprop"]) < 600 and float(row["backprop_seconds"]) > 0
        assert float(row["scored_loss"]) > 0 and 0 <= float(row["scored_accuracy"]) <= 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["mining"]["mode"] == "selective"
    assert results["mining"]["examples_backprop"] == sum(int(r["examples_backprop"]) for r in rows)
    assert len(results["hardest_examples"]["losses"]) == 64


def test_the_run_totals_sum_the_counters_and_average_the_backprop_fraction():
    from cifar100.config import make_config
    from cifar100.evaluate import _mining_totals

    config = make_config("smoke", {"hem": True, "hem_mode": "selective"})
    unmined = {"examples_forward": "0", "forward_seconds": "0", "examples_backprop": "0", "backprop_seconds": "0",
               "backprop_fraction": "0", "scored_loss": "nan", "scored_accuracy": "nan"}  # phase 1 on features
    mined = [{"examples_forward": "900", "forward_seconds": "1.5", "examples_backprop": str(n),
              "backprop_seconds": "2.25", "backprop_fraction": str(n / 900), "scored_loss": "1.2",
              "scored_accuracy": "0.5"} for n in (360, 450)]
    totals = _mining_totals(config, [unmined, *mined])
    assert totals == {"mode": "selective", "examples_forward": 1800, "forward_seconds": 3.0, "examples_backprop": 810,
                      "backprop_seconds": 4.5, "backprop_fraction": 0.45}
    assert _mining_totals(config.replace(hem=False), mined) is None
