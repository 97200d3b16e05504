"""TensorFlow's C++ log lines are hidden by default, everything else on stderr is kept."""

import os
import subprocess
import sys
import textwrap

import pytest

from cifar100 import keras_internals

from .conftest import ROOT


def test_filtered_stderr_drops_only_the_known_noise(capfd):
    with keras_internals.filtered_stderr():
        os.write(2, b"I0000 00:00:1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be "
                    b"used.\nE0000 00:00:2 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
                    b"a line that matters\n")
        print("a Python warning that matters", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["a Python warning that matters", "a line that matters"]


def test_a_line_tensorflow_writes_at_the_first_step_is_filtered_and_later_lines_are_kept(capfd):
    """oneDNN's "supports DT_INT64 only on platforms with AVX-512" comes as fit's first step builds its graph
    (on a CPU without AVX-512, so not on every machine): a layer writes it to fd 2 when traced."""
    import keras
    import numpy as np

    class Noisy(keras.layers.Layer):
        noisy = False  # not while the model is built, before fit

        def call(self, x):
            if self.noisy:
                os.write(2, b"I0000 util.cc:131] oneDNN supports DT_INT64 only on platforms with AVX-512.\n"
                            b"a C++ line that matters\n")
            return x

    class Later(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            os.write(2, f"epoch {epoch} line\n".encode())

    model = keras.Sequential([keras.Input((2,)), Noisy(), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.layers[0].noisy = True
    x, y = np.zeros((8, 2), np.float32), np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=4, verbose=0,
              callbacks=[keras_internals.QuietFirstSteps(), Later()])
    err = capfd.readouterr().err
    assert "oneDNN supports DT_INT64" not in err and "a C++ line that matters" in err
    assert "epoch 0 line" in err and "epoch 1 line" in err


@pytest.mark.parametrize("raised, status, shown", [
    ('RunError("the backup is not this model\'s")', 2, "error: the backup is not this model's"),
    ("KeyboardInterrupt()", 130, "interrupted: what was saved is kept"),
    ('ValueError("a bug")', 1, "ValueError: a bug")])
def test_an_error_in_fits_first_step_is_shown_by_the_command_line(raised, status, shown):
    """QuietFirstSteps holds fd 2 back from fit's start to the end of its first step: an error before that end
    (a backup that does not fit, Ctrl-C) was written into the hold and never seen, the exit silent."""
    script = textwrap.dedent(f"""
        import sys
        from cifar100 import __main__ as cli, keras_internals
        from cifar100.config import RunError

        def train(args):
            keras_internals.QuietFirstSteps().on_train_begin()  # fit begins: TensorFlow's first lines held back
            raise {raised}  # and fails before its first step ends

        cli._train = train
        sys.exit(cli.main(["train", "--preset", "smoke"]))""")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == status and shown in result.stderr, result.stderr


def test_a_notebook_cell_whose_fit_fails_in_its_first_step_lets_go_of_stderr(capfd):
    from IPython.core.interactiveshell import InteractiveShell

    from cifar100 import notebook

    shell = InteractiveShell.instance()
    try:
        notebook.setup()
        notebook.setup()  # the first cell run again
        assert shell.events.callbacks["post_run_cell"].count(keras_internals.release_held_stderr) == 1
        result = shell.run_cell("import os\nfrom cifar100 import keras_internals\n"
                                "keras_internals.QuietFirstSteps().on_train_begin()\n"
                                "os.write(2, b'a C++ line of the failed step\\n')\n"
                                "raise ValueError('fit failed')")
        assert isinstance(result.error_in_exec, ValueError)
        assert keras_internals.HeldStderr.holding == []  # fd 2 is the terminal's again
        assert "a C++ line of the failed step" in capfd.readouterr().err  # what was held, written out
    finally:
        keras_internals.release_held_stderr()
        InteractiveShell.clear_instance()


def command_line_stderr(**env) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CIFAR100_TF_LOGS")}
    result = subprocess.run([sys.executable, "-m", "cifar100", "predict", "/nonexistent/run", "x.png"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**environment, **env})
    assert result.returncode == 2
    return result.stderr


@pytest.mark.slow  # over 5 s: left out of `make test-fast`
def test_the_command_line_prints_no_tensorflow_log_lines_unless_asked():
    # `predict` imports Keras (and so TensorFlow, and probes CUDA) before it finds no run folder
    quiet = command_line_stderr()
    assert quiet == "error: /nonexistent/run/config.json not found: is /nonexistent/run a finished run folder?\n"
    # the README's Python snippet: its imports bring in TensorFlow quietly too
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CIFAR100_TF_LOGS")}
    imported = subprocess.run([sys.executable, "-c", "from cifar100 import data, train"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=environment)
    assert imported.returncode == 0 and imported.stderr == "", imported.stderr
    loud = command_line_stderr(CIFAR100_TF_LOGS="1", TF_CPP_MIN_LOG_LEVEL="0")
    assert any(keras_internals.NOISE.search(line) for line in loud.splitlines()), loud


def test_predictions_trace_one_batch_shape_and_equal_keras_own():
    """keras_internals.predict pads the last batch: one traced shape, where Keras traces each last batch's size."""
    import keras
    import numpy as np

    class Probe(keras.layers.Layer):
        def __init__(self, record):
            super().__init__()
            self.record = record  # a function: Keras would track a list attribute as a copy

        def call(self, x):
            self.record(x.shape[0])  # a trace runs the Python code once (Keras' symbolic build: None)
            return x

    traced = {"padded": [], "plain": []}
    padded, plain = (keras.Sequential([keras.Input((4,)), Probe(traced[name].append),
                                       keras.layers.Dense(3, activation="softmax")]) for name in traced)
    plain.set_weights(padded.get_weights())
    images = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    for count in (5, 37, 64, 100):
        found = keras_internals.predict(padded, images[:count], batch_size=32)
        assert found.shape == (count, 3)
        np.testing.assert_allclose(found, plain.predict(images[:count], batch_size=32, verbose=0), atol=1e-6)
    assert set(traced["padded"]) - {None} == {32} and len(traced["padded"]) <= 2  # one trace (+ the build)
    assert len(traced["plain"]) > 1  # Keras' own: the batch of 5, then again at a relaxed shape for the others
