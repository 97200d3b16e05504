"""Each workaround in cifar100/keras_fixes.py still needed: these fail when Keras or TensorFlow no longer need it."""

import os
import subprocess
import sys

from cifar100.keras_fixes import keras, seed_generator_states

from .conftest import ROOT


def test_tensorflow_still_writes_start_up_lines_that_the_import_of_cifar100_drops():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    plain = subprocess.run([sys.executable, "-c", "import tensorflow as tf; tf.config.list_physical_devices('GPU')"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    quiet = subprocess.run([sys.executable, "-c", "import cifar100.keras_fixes"], capture_output=True, text=True,
                           env=env, cwd=ROOT)
    assert "All log messages before absl::InitializeLog() is called" in plain.stderr  # still written: still needed
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_random_layers_keep_their_stream_outside_the_weights_that_a_checkpoint_saves():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dropout(0.5, seed=1)(keras.layers.RandomFlip(seed=2)(inputs)))
    states = seed_generator_states(model)
    assert len(states) == 2 and not {id(v) for v in states} & {id(w) for w in model.weights}
