"""Training images/s of one fit epoch for each backbone@size, backbone frozen (phase 1 with live features) and
fine-tuning (phase 2: every layer but BatchNorm trains, as with pretrained weights), the model built as main.ipynb
builds it: uint8 32x32 -> Rescaling -> Resizing -> the backbone's preprocessing -> keras.applications backbone
(weights=None: random, speed only) -> Dropout -> Dense softmax. Two inputs to `fit`: what the notebook passes,
TrainBatches(...).as_fit_input() (cifar100.keras_fixes.fit_input: tf.data), and the plain PyDataset,
`fit(batches)`. Each timed fit is one epoch of --steps batches, after a warm-up fit (tracing) of the same input.

    .venv/bin/python benchmarks/throughput.py --models mobilenetv3small@96 resnet50@224 --batch-size 32 --steps 20
    .venv/bin/python benchmarks/throughput.py --quick     # mobilenetv3small@64, batch 32, 4 steps (~40 s)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ["backbone", "image size", "phase", "batch", "steps", "images/s, fit_input (tf.data)",
           "images/s, plain PyDataset", "fit_input / plain"]


def build(backbone: str, size: int):
    """main.ipynb's model cell with weights=None, its dropout and 100 classes; returns (model, backbone)."""
    from cifar100.batches import keras, preprocessing
    from cifar100.config import BACKBONES

    layers, (application, input_convention, _) = keras.layers, BACKBONES[backbone]
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0)(inputs)  # uint8 -> float
    x = layers.Resizing(size, size, interpolation="bilinear")(x)
    x = preprocessing(input_convention)(x)
    net = getattr(keras.applications, application)(include_top=False, weights=None, input_shape=(size, size, 3),
                                                   pooling="avg")
    head = keras.Sequential([layers.Dropout(0.2), layers.Dense(100, activation="softmax", dtype="float32")])
    return keras.Model(inputs, head(net(x))), net


def measure(backbone: str, size: int, phase: str, batch_size: int, steps: int) -> dict:
    import numpy as np

    from cifar100 import distribute
    from cifar100.batches import TrainBatches, keras

    model, net = build(backbone, size)
    net.trainable = phase == "fine-tuning"
    for layer in net.layers if net.trainable else []:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=distribute.jit_compile("auto"))

    def batches(count):
        images = np.random.default_rng(count).integers(0, 256, (count * batch_size, 32, 32, 3), dtype=np.uint8)
        return TrainBatches(images, np.arange(len(images)) % 100, 100, batch_size)

    rates = {}
    for name, make in (("fit_input", lambda b: b.as_fit_input()), ("plain", lambda b: b)):
        model.fit(make(batches(2)), epochs=1, verbose=0, shuffle=False)  # warm-up: traces the step
        timed = make(batches(steps))
        started = time.perf_counter()
        model.fit(timed, epochs=1, verbose=0, shuffle=False)
        rates[name] = steps * batch_size / (time.perf_counter() - started)
    keras.backend.clear_session()
    return {"backbone": backbone, "image size": size, "phase": phase, "batch": batch_size, "steps": steps,
            "images/s, fit_input (tf.data)": f"{rates['fit_input']:.1f}",
            "images/s, plain PyDataset": f"{rates['plain']:.1f}",
            "fit_input / plain": f"{rates['fit_input'] / rates['plain']:.2f}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv3small@96", "mobilenetv3small@160"],
                        help="backbone@size pairs (cifar100.config.BACKBONES)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="mobilenetv3small@64, batch 32, 4 steps")
    args = parser.parse_args(argv)
    args.models, args.batch_size, args.steps = (["mobilenetv3small@64"], 32, 4) if args.quick else (
        args.models, args.batch_size, args.steps)
    from cifar100.batches import keras  # first: cifar100 quiets TensorFlow's start-up lines

    tf = sys.modules["tensorflow"]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    gpus = ", ".join(device.name for device in tf.config.list_logical_devices("GPU")) or "none"
    rows = [measure(pair.split("@")[0], int(pair.split("@")[1]), phase, args.batch_size, args.steps)
            for pair in args.models for phase in ("frozen", "fine-tuning")]
    print(f"CPU: {cpu} ({len(os.sched_getaffinity(0))} cores usable); GPU: {gpus}; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
