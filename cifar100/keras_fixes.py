"""What works around Keras or TensorFlow, in one place: each names what it works around, its upstream issue,
and the test that fails when Keras or TensorFlow no longer needs it."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

import numpy as np

NOISE = re.compile("|".join([  # TensorFlow's start-up lines that say nothing to a user of this project
    r"All log messages before absl::InitializeLog\(\) is called", r"Could not find cuda drivers",
    r"failed call to cuInit", r"oneDNN custom operations are on", r"cpu_feature_guard\.cc",
    r"rebuild TensorFlow with the appropriate compiler flags", r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered", r"TF-TRT Warning",
]))


@contextlib.contextmanager
def quiet_start_up_lines():
    """Drop TensorFlow's start-up lines from file descriptor 2 while it is imported. TF_CPP_MIN_LOG_LEVEL (set by
    `import cifar100`) quiets its logging, but Abseil writes some lines before that logging is set up
    (abseil/abseil-cpp#1718, #1957). Every other line, and every line with CIFAR100_TF_LOGS=1, is kept.
    Tested by tests/test_training.py::test_a_refused_setting_or_missing_data_is_one_line_and_leaves_no_folder
    (the command line's error is its only line) and tests/test_keras_fixes.py."""
    if os.environ.get("CIFAR100_TF_LOGS") == "1":
        yield
        return
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True) if not NOISE.search(line)]
            os.write(2, "".join(kept).encode())


def import_keras():
    with quiet_start_up_lines():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # probes CUDA: "failed call to cuInit" on a machine without
    return keras


keras = import_keras()


def fit_input(batches):
    """A PyDataset as tf.data (prefetch 1, autotuning off), read lazily an epoch at a time, on TensorFlow: Keras'
    own iterator stalls at each epoch's start waiting on its model thread (docs/benchmarks.md, "Time outside the
    training steps"; no upstream issue found). Measured by benchmarks/throughput.py (a speed: no test can fail)."""
    if keras.backend.backend() != "tensorflow":
        return batches
    import tensorflow as tf

    first = batches[0]  # reading a batch changes nothing
    signature = tuple(tf.TensorSpec((None,) + np.shape(part)[1:], tf.as_dtype(np.asarray(part).dtype))
                      for part in first)
    dataset = tf.data.Dataset.from_generator(lambda: (batches[i] for i in range(len(batches))),
                                             output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(batches))).prefetch(1)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def seed_generator_states(model) -> list:
    """The state variables of a model's random layers (augmentation, dropout): weights files leave them out and
    no public API reaches them (keras/src/random/seed_generator.py). A resume sets them from (seed, epoch).
    Tested by tests/test_keras_fixes.py (still outside the weights) and by
    tests/test_training.py::test_a_killed_run_resumes_to_the_uninterrupted_result (augmentation and dropout on)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def reduce_structures_one_by_one(strategy) -> None:
    """Make MultiWorkerMirroredStrategy.reduce take what Keras 3's TensorFlow trainer gives it: an (x, y) batch
    with uint8 images reduced element by element, scalar metrics with axis=0. Upstream: keras-team/keras#20585,
    tensorflow/tensorflow#72388 (open). Tested by tests/test_distribute.py (two workers)."""
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
