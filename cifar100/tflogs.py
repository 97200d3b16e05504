"""TensorFlow's C++ log lines, hidden by default; Python warnings are left alone.

`import cifar100` sets TF_CPP_MIN_LOG_LEVEL=2 (errors kept) unless it is set, and `import_keras()` filters the
lines written before TensorFlow's logging is set up. CIFAR100_TF_LOGS=1 (before `import cifar100`) shows every
line. TF_ENABLE_ONEDNN_OPTS is never changed (it changes numerics); only its notice is hidden.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

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


def show_all() -> bool:
    """True when the user asked for every TensorFlow log line (CIFAR100_TF_LOGS=1)."""
    return os.environ.get("CIFAR100_TF_LOGS", "").strip().lower() in ("1", "true", "yes", "on")


def set_default_level() -> None:
    if not show_all():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class HeldStderr:
    """Holds back what is written to file descriptor 2 (C++ code writes there directly) from `hold()` to
    `release()`, then writes it out, less the lines that match `pattern`."""

    def __init__(self, pattern: re.Pattern = NOISE):
        self.pattern, self.saved, self.held = pattern, None, None

    def hold(self) -> None:
        if self.saved is not None or show_all():
            return
        sys.stderr.flush()
        self.held = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.held.fileno(), 2)

    def release(self) -> None:
        if self.saved is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.saved = None
        self.held.seek(0)
        lines = self.held.read().decode(errors="replace").splitlines(keepends=True)
        self.held.close()
        kept = "".join(line for line in lines if not self.pattern.search(line))
        if kept:
            os.write(2, kept.encode())


@contextlib.contextmanager
def filtered_stderr(pattern: re.Pattern = NOISE):
    """HeldStderr around a block."""
    held = HeldStderr(pattern)
    held.hold()
    try:
        yield
    finally:
        held.release()


def quiet_first_steps():
    """A Keras callback filtering TensorFlow's lines while fit's first train and test steps build graphs."""
    import keras

    class QuietFirstSteps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.held = HeldStderr()

        def on_train_begin(self, logs=None):
            self.held.hold()

        def on_test_begin(self, logs=None):
            if not getattr(self, "_tested", False):
                self.held.hold()

        def on_train_batch_end(self, batch, logs=None):
            self.held.release()

        def on_test_batch_end(self, batch, logs=None):
            self._tested = True
            self.held.release()

        def on_train_end(self, logs=None):
            self.held.release()

    return QuietFirstSteps()


def __getattr__(name: str):
    """`from cifar100.tflogs import keras`: Keras, imported (once) as import_keras() does."""
    if name == "keras":
        return import_keras()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def import_keras():
    """Import Keras (and TensorFlow, and probe for GPUs) without TensorFlow's start-up log lines."""
    with filtered_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # CUDA is probed here: "failed call to cuInit" without a GPU
    return keras
