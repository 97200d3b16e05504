"""The one place where this project works around Keras or TensorFlow: their internals, or a behaviour of
theirs that costs time. Each workaround says what it works around, names the upstream issue or the
evidence, and is covered by a test: of the workaround, and where Keras' own behaviour can be observed in a
test, of that too (so that it fails if Keras changes under it).
"""

from __future__ import annotations

import numpy as np


def call_in_inference_mode_by_default(layer, inputs):
    """`layer(inputs)` in a functional model, such that the model runs it in training mode only when it is
    called with `training=True` (by `fit`), not when it is called without `training`.

    A functional model records, for each layer called on symbolic inputs, the `training` default of that
    layer's `call`, and a layer passes its `training` on to the layers called after it (keras/src/layers/
    layer.py, `_resolve_and_populate_arg`; keras/src/models/functional.py, `operation_fn`). Keras' image
    preprocessing layers (Resizing, RandomFlip, RandAugment) default to `training=True`, so `model(x)` and
    `model.export(...)` ran them, and every later layer (Dropout, a BatchNorm that trains), in training mode,
    unlike `model.predict(x)`. Called with `training=False` when the model is built, the layer records False;
    `fit`'s `training=True` still overrides it. Tested by tests/test_models.py (Keras' own behaviour too).
    """
    return layer(inputs, training=False)


def forget_restored_epoch(model) -> None:
    """Let the next fit() start at its own `initial_epoch`.

    BackupAndRestore, when it restores a backup, sets `model._initial_epoch`, and every later fit() of that
    model starts at `model._initial_epoch or initial_epoch` (keras/src/backend/*/trainer.py), so a second
    phase trained with the same model would start at the epoch the first phase's backup held. Related
    upstream: keras-team/keras#19179 (BackupAndRestore and the epoch a fit() starts at). Tested by
    tests/test_run_folder.py::test_keras_keeps_a_restored_epoch_for_later_fits_until_it_is_forgotten.
    """
    model._initial_epoch = None


def reduce_structures_one_by_one(strategy) -> None:
    """Make MultiWorkerMirroredStrategy.reduce take what Keras 3's TensorFlow trainer gives it
    (keras/src/backend/tensorflow/trainer.py):
    - before the first step it reduces one whole (x, y) batch, only to learn its shapes: a tuple, which the
      strategy cannot take, holding uint8 images, which its collective ops cannot reduce. Reduce element
      by element, and give back the local batch for such dtypes;
    - after each step it reduces every scalar metric with axis=0, which a scalar does not have: reduce
      those across replicas with axis=None, which is what the mean over replicas means.
    Upstream: keras-team/keras#20585 ("Does Keras 3 work with tf.distribute.MultiWorkerMirroredStrategy?",
    open) and tensorflow/tensorflow#72388: the TensorFlow multi-worker tutorial fails the same way with Keras 3.
    Tested by tests/test_distribution.py (two workers train one run)."""
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
    """What `fit` is given for a `keras.utils.PyDataset` of training batches: on the TensorFlow backend, the
    same batches, read from it in the same way, as a tf.data pipeline without tf.data's autotuning.

    Keras turns a PyDataset into `Dataset.from_generator(...).prefetch(AUTOTUNE)` with tf.data's default
    options, and builds a new iterator over it for each epoch. With autotuning on, each iterator runs a
    model thread (`tensorflow::data::model::Model::OptimizeLoop`) that sleeps between optimisations for a
    period that keeps growing. The main thread drops the previous epoch's iterator at the start of the next
    epoch (trainer.py: `for ... in epoch_iterator`), and the iterator's destructor waits until that thread
    wakes up: seconds to most of a minute (up to 55 s seen) in which nothing runs (seen with gdb: the main
    thread in `RootDataset::Iterator::~Iterator`, the model thread in `OptimizeLoop`'s timed wait, no thread
    of the process using CPU time).
    That was the time lost "between an epoch's start and its first step" (docs/benchmarks.md). Without
    autotuning there is no model thread; one batch read ahead (`prefetch(1)`) is all this pipeline
    needs: the batches are slices of arrays in memory.

    The batches are read lazily, one epoch at a time, as Keras' own pipeline reads them, so callbacks that
    set the order or the loss weights at the start of an epoch act on that epoch's batches. The PyDataset's
    `workers`, `use_multiprocessing` and its own `on_epoch_begin`/`on_epoch_end` are not used (this
    project's batches use none of them). On other backends the PyDataset is given to Keras unchanged.
    Tested by tests/test_sampling.py; the stall itself is measured by benchmarks/real_images.py (the
    "outside steps s/epoch" column), not by a timed test.
    """
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
