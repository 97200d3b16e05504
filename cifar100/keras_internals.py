"""The one place where this project works around Keras or TensorFlow (their internals, or behaviour that costs
time). Each workaround names what it works around, the upstream issue (where none was found: the Keras source or
the measurement), and the test covering it (and, where a test can observe it, Keras' own behaviour, so that it fails
if Keras changes).

First of them: TensorFlow's C++ log lines. `import cifar100` sets TF_CPP_MIN_LOG_LEVEL=2 (errors kept) unless it
is set; importing this module imports Keras (`from cifar100.keras_internals import keras`) with the lines written
before TensorFlow's logging is set up filtered out (Abseil writes them whatever the level: abseil/abseil-cpp#1718,
#1957, open), and `QuietFirstSteps` filters those of fit's first steps. CIFAR100_TF_LOGS=1 shows every line.
TF_ENABLE_ONEDNN_OPTS is never changed (it changes numerics). Tested by tests/test_tf_log_lines.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import numpy as np

import cifar100

NOISE = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"Could not find cuda drivers on your machine",
    r"failed call to cuInit",
    r"oneDNN custom operations are on",
    r"cpu_feature_guard\.cc",
    r"To enable the following instructions: .* rebuild TensorFlow",
    r"Memory patch applied",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
    r"oneDNN supports DT_\w+ only on platforms with",  # at the first step, on a CPU without AVX-512
]))


class HeldStderr:
    """Holds back what is written to file descriptor 2 (C++ code writes there directly) from `hold()` to
    `release()`, then writes it out, less the lines that match `pattern`."""

    holding: list[HeldStderr] = []  # holds not released yet: see release_held_stderr

    def __init__(self, pattern: re.Pattern = NOISE):
        self.pattern, self.saved, self.held = pattern, None, None

    def hold(self) -> None:
        if self.saved is not None or cifar100.tf_logs_shown():
            return
        sys.stderr.flush()
        self.held = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.held.fileno(), 2)
        HeldStderr.holding.append(self)

    def release(self) -> None:
        if self.saved is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.saved = None
        HeldStderr.holding.remove(self)  # after fd 2 is back: an interrupt before leaves it to release again
        self.held.seek(0)
        lines = self.held.read().decode(errors="replace").splitlines(keepends=True)
        self.held.close()
        kept = "".join(line for line in lines if not self.pattern.search(line))
        if kept:
            os.write(2, kept.encode())


def release_held_stderr(*_) -> None:
    """Write out what every hold still keeps back: an error (or Ctrl-C) in fit's first step leaves QuietFirstSteps'
    hold in place, and with it the error message itself. The command line, `train.run` and each notebook cell's
    end call it."""
    for held in reversed(HeldStderr.holding):
        held.release()


@contextlib.contextmanager
def filtered_stderr(pattern: re.Pattern = NOISE):
    """HeldStderr around a block."""
    held = HeldStderr(pattern)
    held.hold()
    try:
        yield
    finally:
        held.release()


def import_keras():
    """Import Keras (and TensorFlow, and probe for GPUs) without TensorFlow's start-up log lines."""
    with filtered_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # CUDA is probed here: "failed call to cuInit" without a GPU
    return keras


keras = import_keras()


class QuietFirstSteps(keras.callbacks.Callback):
    """Filters TensorFlow's lines while fit's first train and test steps build their graphs."""

    def __init__(self):
        super().__init__()
        self.held, self.tested = HeldStderr(), False

    def on_train_begin(self, logs=None):
        self.held.hold()

    def on_test_begin(self, logs=None):
        if not self.tested:
            self.held.hold()

    def on_train_batch_end(self, batch, logs=None):
        self.held.release()

    def on_test_batch_end(self, batch, logs=None):
        self.tested = True
        self.held.release()

    def on_train_end(self, logs=None):
        self.held.release()


def call_in_inference_mode_by_default(layer, inputs):
    """`layer(inputs)` in a functional model that runs it in training mode only under `training=True` (fit).
    A functional model records each layer's `training` default (keras/src/layers/layer.py `_resolve_and_populate_arg`,
    keras/src/models/functional.py `operation_fn`); Keras' image preprocessing layers default to True, so `model(x)`
    and `export` ran them and every later layer in training mode. No upstream issue found; Keras documents these
    layers as active in training only (keras-team/keras#17385). Tested by tests/test_models.py (Keras' too)."""
    return layer(inputs, training=False)


def predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """`model.predict` in batches of `batch_size` only (a last partial batch padded, its padding dropped; the
    images are not copied): Keras traces its predict step again for each new shape of a last partial batch, and
    TensorFlow warns of "tf.function retracing" (seen with hard-example mining, which predicts on sets of several
    sizes; upstream: tensorflow/tensorflow#38561, #34907). Tested by tests/test_tf_log_lines.py."""
    full, rest = len(images) - len(images) % batch_size, len(images) % batch_size
    if not rest:  # full batches only (or no image)
        return np.asarray(model.predict(images, batch_size=batch_size, verbose=0))
    last = np.concatenate([images[full:], np.repeat(images[-1:], batch_size - rest, axis=0)])
    parts = [model.predict(images[:full], batch_size=batch_size, verbose=0)] if full else []
    parts.append(model.predict(last, batch_size=batch_size, verbose=0)[:rest])
    return np.concatenate([np.asarray(part) for part in parts])


def forget_restored_epoch(model) -> None:
    """Let the next fit() start at its own `initial_epoch`: a restored BackupAndRestore sets `model._initial_epoch`,
    which every later fit() starts from (keras/src/backend/*/trainer.py; related: keras-team/keras#19179). Tested
    by tests/test_run_folder.py::test_keras_keeps_a_restored_epoch_for_later_fits_until_it_is_forgotten."""
    model._initial_epoch = None


def called_on(model, layer):
    """The tensor of `model`'s graph that `layer`, a nested model called once there, is called on. `layer.input` is
    the nested model's own Input, and a model cannot be cut inside a nested one (keras-team/keras#16123, open):
    the node of the call in `model`'s graph (`_nodes_by_depth`) is read. Tested by
    tests/test_training_levers.py::test_cached_finetuning_trains_the_top_on_activations_computed_once."""
    in_model = {id(node) for nodes in model._nodes_by_depth.values() for node in nodes}
    calls = [node for node in layer._inbound_nodes if id(node) in in_model]
    if len(calls) != 1:
        raise ValueError(f"layer {layer.name!r} is called {len(calls)} times in model {model.name!r}, not once")
    return calls[0].input_tensors[0]


def reduce_structures_one_by_one(strategy) -> None:
    """Make MultiWorkerMirroredStrategy.reduce take what Keras 3's TF trainer gives it (its trainer.py): a tuple
    (x, y) batch with uint8 images, reduced element by element (local values for such dtypes), and scalar metrics
    with axis=0, reduced with axis=None. Upstream: keras-team/keras#20585 (open), tensorflow/tensorflow#72388
    (the TF multi-worker tutorial fails the same way). Tested by tests/test_distribution.py (two workers)."""
    import tensorflow as tf

    reduce_one = strategy.reduce
    reducible = (tf.bfloat16, tf.float16, tf.float32, tf.float64, tf.int32, tf.int64)

    def reduce(reduce_op, value, axis=None):
        def one(item):
            local = strategy.experimental_local_results(item)[0]
            if local.dtype not in reducible:
                return local
            return reduce_one(reduce_op, item, axis=None if local.shape.rank == 0 else axis)

        return tf.nest.map_structure(one, value)

    strategy.reduce = reduce


def fit_input(batches):
    """`fit`'s input for a PyDataset on TensorFlow: the same batches, read lazily an epoch at a time (its workers
    and epoch hooks unused), as tf.data with prefetch(1) and autotuning off; other backends get it unchanged.
    Keras' autotuned iterator stalls each new epoch waiting on its sleeping model thread (docs/benchmarks.md).
    Tested by tests/test_batches.py; the stall is measured by benchmarks/real_images.py."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return batches
    import tensorflow as tf

    def spec(array):
        array = np.asarray(array)
        return tf.TensorSpec((None,) + array.shape[1:], tf.as_dtype(array.dtype))

    def generate():
        for index in range(len(batches)):
            yield batches[index]

    signature = tuple(spec(part) for part in batches[0])  # a peek: reading a batch changes nothing
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(batches))).prefetch(1)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def seed_generator_states(model) -> list:
    """The state variables of the model's random layers, in model order: no public API reaches them and weights
    files leave them out (`seed_generator_state`, keras/src/random/seed_generator.py). Tested by
    tests/test_training_levers.py (each layer its own stream)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def replace_train_step(model, step) -> None:
    """Train `model` with `step` (batch -> logs) in the next fit(): Keras builds its step from `model.train_step`
    (keras/src/backend/tensorflow/trainer.py), so an instance attribute overrides it; a log key the metrics lack
    makes Keras report the logs as they are. Tested by tests/test_mining.py (selective backprop)."""
    model.train_step = step
    model.train_function = None  # fit() builds its step function again, from this step


def restore_train_step(model) -> None:
    """The class's own step again, for a later fit()."""
    if "train_step" in vars(model):
        del model.train_step
        model.train_function = None


class Upsample(keras.layers.Resizing):
    """Resizing that trains at `training_size` when set (progressive resizing; training model only). Resizing can't
    change size once built, so `height`/`width` are swapped for the call. A traced step keeps its size: rebuild it
    after a change (callbacks.ProgressiveResizing does). Tested by tests/test_training_levers.py."""

    def __init__(self, height, width, **kwargs):
        super().__init__(height, width, **kwargs)
        self.training_size: int | None = None

    def transform_images(self, images, transformation=None, training=True):
        if not (training and self.training_size):
            return super().transform_images(images, transformation, training)
        full = self.height, self.width  # Resizing's own path (dtype cast, crop and pad options) at the small size
        self.height = self.width = self.training_size
        try:
            return super().transform_images(images, transformation, training)
        finally:
            self.height, self.width = full


class RandomShift(keras.layers.Layer):
    """RandomTranslation(fill_mode="reflect") by whole pixels, up to `max_shift` each way (training only), that XLA
    can compile: RandomTranslation lowers to ImageProjectiveTransformV3, which has no XLA kernel, so Keras turns
    `jit_compile` off for a model holding it ("Model doesn't support `jit_compile=True`"). Upstream:
    tensorflow/tensorflow#55194, #100865 (XLA kernels added by #126685, not in TensorFlow 2.21.0). Tested by
    tests/test_training_levers.py (Keras' fallback too)."""

    def __init__(self, max_shift: int = 4, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_shift, self.seed = int(max_shift), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or self.max_shift == 0:
            return images
        ops, pad = keras.ops, self.max_shift
        size = ops.shape(images)[1:3]
        padded = ops.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="reflect")
        offsets = keras.random.randint((ops.shape(images)[0], 2), 0, 2 * pad + 1, seed=self.seed_generator)
        rows = offsets[:, :1] + ops.arange(size[0])[None, :]  # (B, H): the padded rows each image keeps
        cols = offsets[:, 1:] + ops.arange(size[1])[None, :]
        shifted = ops.take_along_axis(padded, rows[:, :, None, None], axis=1)
        return ops.take_along_axis(shifted, cols[:, None, :, None], axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_shift": self.max_shift, "seed": self.seed}
