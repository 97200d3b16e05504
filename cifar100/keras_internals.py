"""The one place where this project relies on Keras or TensorFlow internals. Each workaround says what it
works around, names the upstream issue, and is covered by a test that fails if Keras changes under it.
"""

from __future__ import annotations


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
