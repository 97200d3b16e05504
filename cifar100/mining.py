"""Hard-example mining (`hem=True`): training emphasises the examples with the largest categorical cross-entropy.

- "reweight": every `hem_every` epochs an inference pass scores a `hem_fraction` of the training set; every example
  is still seen once an epoch, its loss weighted by (loss / mean loss) ** strength mixed with a uniform floor.
- "selective" (Selective-Backprop, Jiang et al. 2019, arXiv:1910.00762): each step scores the whole batch in
  inference mode and keeps an example with probability p ** beta (p: its loss's percentile among recent losses,
  beta = 1 / selectivity - 1); only the kept ones, topped up to a multiple of an eighth of the batch, backpropagate.

Both log per epoch `examples_forward` / `forward_seconds` (scoring) and `examples_backprop` / `backprop_seconds`
(training); `loss` and the metrics are the training passes', and the selective mode logs its scoring passes as
`scored_loss` and `scored_accuracy` (`log_keys` lists a mode's columns).
"""

from __future__ import annotations

import time

import numpy as np

from cifar100 import keras_internals, models
from cifar100.batches import TrainBatches
from cifar100.config import Config, RunError
from cifar100.keras_internals import keras  # Keras, imported without TensorFlow's start-up lines

LOG_KEYS = ("examples_forward", "forward_seconds", "examples_backprop", "backprop_seconds", "backprop_fraction")
COUNTERS = LOG_KEYS[:4]
SCORED_KEYS = ("scored_loss", "scored_accuracy")  # the selective mode's scoring passes (not counters)


def log_keys(config: Config) -> tuple[str, ...]:
    """The history.csv columns mining adds: none without `hem`, LOG_KEYS, and SCORED_KEYS too in the selective mode."""
    if not config.hem:
        return ()
    return LOG_KEYS + (SCORED_KEYS if config.hem_mode == "selective" else ())


def per_example_cross_entropy(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                              batch_size: int = 256) -> np.ndarray:
    """Categorical cross-entropy of each example, in inference mode (no augmentation, no dropout)."""
    probabilities = keras_internals.predict(model, images, batch_size)
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))


def mining_weights(losses: np.ndarray, strength: float, floor: float) -> np.ndarray:
    """Per-example loss weights of mean 1: (loss / mean) ** strength mixed with a uniform floor (each >= `floor`)."""
    n = len(losses)
    weights = (np.maximum(losses, 0) / max(float(np.mean(losses)), 1e-12)) ** strength
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        weights = np.ones(n)
    return floor + (1 - floor) * n * weights / weights.sum()


def hardest_examples(model: keras.Model, images: np.ndarray, labels: np.ndarray, fraction: float, keep: int,
                     seed: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` highest-loss examples of a seeded `fraction` of the set: (indices, losses), hardest first."""
    n = len(images)
    count = max(1, int(round(fraction * n)))
    chosen = np.arange(n) if count >= n else np.sort(np.random.default_rng(seed).choice(n, count, replace=False))
    losses = per_example_cross_entropy(model, images[chosen], labels[chosen], batch_size)
    order = np.argsort(-losses)[:keep]
    return chosen[order], losses[order]


class HardExampleMining(keras.callbacks.Callback):
    """The "reweight" mode: every `every` epochs, scores a `fraction` of the examples and reweights their losses."""

    def __init__(self, sampler: TrainBatches, every: int = 1, fraction: float = 1.0, strength: float = 1.0,
                 floor: float = 0.5, seed: int = 0, batch_size: int = 256):
        super().__init__()
        if not sampler.weighted:
            raise ValueError("the reweight mode needs a sampler made with weighted=True")
        self.sampler, self.every, self.fraction = sampler, every, fraction
        self.strength, self.floor, self.seed, self.batch_size = strength, floor, seed, batch_size
        self.losses = np.full(len(sampler.images), np.nan)  # latest known loss of each example

    def score(self, epoch: int = 0) -> tuple[int, float]:
        """Score a sample of the training set and update the sampler: (examples scored, seconds)."""
        started = time.perf_counter()
        n = len(self.sampler.images)
        count = max(1, int(round(self.fraction * n)))
        rng = np.random.default_rng([self.seed, epoch])
        chosen = np.arange(n) if count >= n else np.sort(rng.choice(n, size=count, replace=False))
        self.losses[chosen] = per_example_cross_entropy(self.model, self.sampler.images[chosen],
                                                        self.sampler.labels[chosen], self.batch_size)
        self._update_sampler()
        return len(chosen), time.perf_counter() - started

    def _update_sampler(self) -> None:
        if np.isnan(self.losses).all():
            self.sampler.set_weights(None)
            return
        known = np.where(np.isnan(self.losses), np.nanmean(self.losses), self.losses)
        self.sampler.set_weights(mining_weights(known, self.strength, self.floor))

    def on_epoch_end(self, epoch, logs=None):
        scored, seconds = self.score(epoch) if (epoch + 1) % self.every == 0 else (0, 0.0)
        if logs is not None:
            logs.update(examples_forward=scored, forward_seconds=seconds, examples_backprop=len(self.sampler.images),
                        backprop_seconds=logs.get("train_seconds", 0.0), backprop_fraction=1.0)

    def get_state(self) -> dict:
        """What a resumed run needs to continue exactly: the known losses."""
        return {"losses": [None if np.isnan(v) else float(v) for v in self.losses]}

    def set_state(self, state: dict | None) -> None:
        try:
            losses = np.array([np.nan if v is None else v for v in state["losses"]], dtype=np.float64)
        except (TypeError, ValueError, KeyError):
            losses = None
        if losses is None or losses.shape != self.losses.shape or np.isinf(losses).any() or (losses < 0).any():
            raise RunError(f"damaged mining state in the run folder's backup: expected {len(self.losses)} losses "
                           "(numbers >= 0, or null where unknown); delete the run folder to start over")
        self.losses = losses
        self._update_sampler()


class SelectiveBackprop(keras.callbacks.Callback):
    """The "selective" mode: while `fit` runs, the training step backpropagates only the examples whose loss ranks
    high among the last `window` seen. Needs TensorFlow, and turns XLA off: the kept batch varies in size. Works
    under tf.distribute (each replica selects its part; the window holds the first replica's) and mixed precision."""

    def __init__(self, selectivity: float = 0.5, window: int = 1024, seed: int = 0):
        super().__init__()
        if not 0 < selectivity <= 1:
            raise ValueError(f"selectivity must be in (0, 1], got {selectivity}")
        self.selectivity, self.window_size, self.seed = float(selectivity), int(window), int(seed)
        self._state_for = None  # the model whose strategy the state variables were made under

    def set_model(self, model):
        super().set_model(model)
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("hem_mode='selective' needs Keras' TensorFlow backend: it backpropagates a batch "
                               f"whose size varies from step to step, which {keras.backend.backend()}'s "
                               "compiled steps do not allow; use hem_mode='reweight'")
        if self._state_for is not model:
            self.make_state(model)
        if model.jit_compile:
            model.jit_compile = False  # XLA needs static shapes
        keras_internals.replace_train_step(model, self._train_step)

    def on_train_end(self, logs=None):
        keras_internals.restore_train_step(self.model)

    def make_state(self, model) -> None:
        with model.distribute_strategy.scope():
            self.window = keras.Variable(np.zeros(self.window_size, np.float32), trainable=False,
                                         aggregation="only_first_replica", name="sb_window")
            self.seen = keras.Variable(0, dtype="int64", trainable=False, aggregation="only_first_replica",
                                       name="sb_seen")
            self.counters = {key: keras.metrics.Sum(name=key) for key in COUNTERS}
            self.loss_metric = keras.metrics.Mean(name="loss")
            self.scored = {"scored_loss": keras.metrics.Mean(name="scored_loss"),
                           "scored_accuracy": keras.metrics.CategoricalAccuracy(name="scored_accuracy")}
        self._state_for = model

    def _train_step(self, data):
        import tensorflow as tf

        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        started = tf.timestamp()
        with tf.control_dependencies([started]):
            scores = model(x, training=False)
        # the mining definition: plain cross-entropy, in float32 whatever the precision policy
        losses = tf.cast(keras.losses.categorical_crossentropy(y, scores), tf.float32)
        with tf.control_dependencies([losses]):
            scored = tf.timestamp()
        keep = self._select(tf, losses, tf.cast(model.optimizer.iterations, tf.int32))
        chosen = self._bucketed(tf, keep, losses)
        x_kept, y_kept = tf.gather(x, chosen), tf.gather(y, chosen)
        weight_kept = None if sample_weight is None else tf.gather(sample_weight, chosen)
        with tf.GradientTape() as tape:
            predictions = model(x_kept, training=True)
            loss = model.compute_loss(x=x_kept, y=y_kept, y_pred=predictions, sample_weight=weight_kept,
                                      training=True)
            scaled = model.optimizer.scale_loss(loss)
        variables = model.trainable_weights
        gradients = tape.gradient(scaled, variables)
        with tf.control_dependencies(gradients):
            applied = model.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        with tf.control_dependencies([tf.identity(model.optimizer.iterations), *([applied] if applied is not None
                                                                               else [])]):
            trained = tf.timestamp()
        self._remember(tf, losses)
        batch = tf.cast(tf.shape(losses)[0], tf.float32)
        self.counters["examples_forward"].update_state(batch)
        self.counters["examples_backprop"].update_state(tf.cast(tf.size(chosen), tf.float32))
        self.counters["forward_seconds"].update_state(tf.cast(scored - started, tf.float32))
        self.counters["backprop_seconds"].update_state(tf.cast(trained - scored, tf.float32))
        # as Keras logs it: the unscaled loss, times the replicas (compute_loss divides by them), per example seen
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.loss_metric.update_state(loss * replicas, sample_weight=tf.size(chosen))
        logs = model.compute_metrics(x_kept, y_kept, predictions, sample_weight=weight_kept)
        logs["loss"] = self.loss_metric.result()
        # the scoring pass, over every example of the batch, apart: the cross-entropy it ranks, and accuracy
        self.scored["scored_loss"].update_state(losses)
        self.scored["scored_accuracy"].update_state(y, scores)
        logs.update({key: metric.result() for key, metric in self.scored.items()})
        # a key that the model's metrics do not have (see keras_internals.replace_train_step)
        logs["backprop_fraction"] = (self.counters["examples_backprop"].result()
                                     / tf.maximum(self.counters["examples_forward"].result(), 1.0))
        return logs

    def _select(self, tf, losses, step):
        """Keep each example with probability percentile ** beta; the batch's hardest is always kept."""
        known = tf.minimum(self.seen.value, self.window_size)
        recent = self.window.value[:tf.cast(known, tf.int32)]
        below = tf.reduce_sum(tf.cast(recent[None, :] < losses[:, None], tf.float32), axis=1)
        percentile = tf.where(known > 0, below / tf.maximum(tf.cast(known, tf.float32), 1.0), 1.0)
        beta = 1.0 / self.selectivity - 1.0
        draws = tf.random.stateless_uniform(tf.shape(losses), seed=tf.stack([step, self.seed]))
        replica = tf.distribute.get_replica_context()
        if replica is not None:  # another stream on each replica
            draws = tf.random.stateless_uniform(tf.shape(losses), seed=tf.stack(
                [step, self.seed * 1000 + tf.cast(replica.replica_id_in_sync_group, tf.int32)]))
        keep = draws < tf.pow(percentile, beta)
        return tf.logical_or(keep, tf.equal(tf.range(tf.shape(losses)[0]),
                                            tf.cast(tf.argmax(losses), tf.int32)))

    @staticmethod
    def _bucketed(tf, keep, losses):
        """The indices to backpropagate: the kept examples, topped up with the highest-loss others to a multiple of
        an eighth of the batch, so that only eight batch shapes occur (each new one sets up its kernels)."""
        size = tf.shape(losses)[0]
        bucket = tf.maximum(1, (size + 7) // 8)
        kept = tf.reduce_sum(tf.cast(keep, tf.int32))
        count = tf.minimum(size, (kept + bucket - 1) // bucket * bucket)
        priority = tf.where(keep, losses + 1e9, losses)  # the kept ones first, then by loss
        return tf.math.top_k(priority, k=count, sorted=False).indices

    def _remember(self, tf, losses):
        """Write the batch's losses into the ring buffer of recent losses."""
        count = tf.shape(losses)[0]
        start = tf.cast(self.seen.value % self.window_size, tf.int32)
        positions = (start + tf.range(count)) % self.window_size
        values = tf.tensor_scatter_nd_update(self.window.value, positions[:, None], tf.cast(losses, tf.float32))
        self.window.assign(values)
        self.seen.assign_add(tf.cast(count, tf.int64))

    def on_epoch_begin(self, epoch, logs=None):
        for metric in [*self.counters.values(), self.loss_metric, *self.scored.values()]:
            metric.reset_state()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        replicas = self.model.distribute_strategy.num_replicas_in_sync
        for key, metric in self.counters.items():
            value = float(keras.ops.convert_to_numpy(metric.result()))
            logs[key] = value / replicas if key.endswith("seconds") else int(round(value))
        logs["backprop_fraction"] = logs["examples_backprop"] / max(logs["examples_forward"], 1)

    def get_state(self) -> dict:
        """The window of recent losses: a resumed run selects as the uninterrupted one would."""
        return {"window": keras.ops.convert_to_numpy(self.window.value).tolist(),
                "seen": int(keras.ops.convert_to_numpy(self.seen.value))}

    def set_state(self, state: dict | None) -> None:
        try:
            window, seen = np.asarray(state["window"], dtype=np.float32), state["seen"]
            if not isinstance(seen, int) or isinstance(seen, bool) or not 0 <= seen < 2**31 \
                    or window.shape != (self.window_size,) or np.isinf(window).any() or (window < 0).any():
                raise ValueError(seen)
        except (TypeError, ValueError, KeyError):
            raise RunError(f"damaged mining state in the run folder's backup: expected a window of {self.window_size} "
                           "recent losses (numbers >= 0, or NaN) and the count seen; delete the run folder to start "
                           "over") from None
        self.window.assign(window)
        self.seen.assign(seen)


def make_mining(config: Config, sampler: TrainBatches, model: keras.Model | None = None):
    """The run's mining callback, or None when `hem` is off. `model`: the one whose strategy the selective
    mode's state is made under (it can also be made at the first fit)."""
    if not config.hem:
        return None
    if config.hem_mode == "selective":
        mining = SelectiveBackprop(config.hem_selectivity, config.hem_window, config.seed)
        if model is not None:
            mining.make_state(model)
        return mining
    return HardExampleMining(sampler, every=config.hem_every, fraction=config.hem_fraction,
                             strength=config.hem_strength, floor=config.hem_floor, seed=config.seed,
                             batch_size=models.inference_batch_size(config))
