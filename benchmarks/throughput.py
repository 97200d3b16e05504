"""Training images per second per backbone, image size, phase, precision, XLA and TensorFlow thread setting.

Each measurement runs in its own process (TensorFlow's thread settings must be set before it starts):
a warm-up fit() (tracing, compiling), then a timed fit() over `--steps` batches of random uint8 32x32
images, upsampled inside the model. Weights are random: speed does not depend on their values.
Runs unchanged on a GPU, and on the JAX backend (KERAS_BACKEND=jax; thread settings then do not apply).

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --models mobilenetv3small@96 resnet50@224 --inter-op 0 1
    python benchmarks/throughput.py --models resnet50@224 --precisions float32 mixed_bfloat16 --xla off on
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, run_isolated, table  # noqa: E402

COLUMNS = ["backend", "device", "backbone", "image size", "phase", "precision", "XLA asked", "XLA in force",
           "inter-op threads",
           "batch", "warm-up s", "images/s"]


def measure(backbone: str, size: int, phase: str, precision: str, xla: str, inter_op: int, batch_size: int,
            steps: int) -> dict:
    import keras
    import numpy as np

    if keras.backend.backend() == "tensorflow" and inter_op:
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    keras.mixed_precision.set_global_policy(precision)
    from cifar100 import models
    from cifar100.batches import TrainBatches
    from cifar100.config import Config

    config = Config(backbone=backbone, image_size=size, weights=None)
    model = models.build_model(config, 100)
    models.set_phase(model, "head" if phase == "frozen" else "finetune")
    # "auto" lets Keras decide, as training does; the table reports what was in force (model.jit_compile)
    model.compile(optimizer="adam", loss="categorical_crossentropy",
                  jit_compile={"auto": "auto", "on": True, "off": False}[xla])
    rng = np.random.default_rng(0)

    def batches(count):
        images = rng.integers(0, 256, (count * batch_size, 32, 32, 3), dtype=np.uint8)
        return TrainBatches(images, np.arange(len(images)) % 100, 100, batch_size)

    started = time.perf_counter()
    model.fit(batches(2), epochs=1, verbose=0)
    warm_up = time.perf_counter() - started
    timed = batches(steps)
    started = time.perf_counter()
    model.fit(timed, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    gpus = models.gpu_names()
    return {"backend": keras.backend.backend(), "device": ", ".join(gpus) or f"CPU x{os.cpu_count()}",
            "backbone": backbone, "image size": size, "phase": phase, "precision": precision,
            "XLA asked": xla, "XLA in force": "on" if model.jit_compile else "off",
            "inter-op threads": inter_op or "default", "batch": batch_size,
            "warm-up s": warm_up, "images/s": steps * batch_size / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="mobilenetv3small@32 only, both phases")
    parser.add_argument("--models", nargs="+", default=["mobilenetv3small@96", "resnet50@32", "resnet50@224"],
                        help="backbone@size pairs")
    parser.add_argument("--phases", nargs="+", default=["frozen", "finetune"], choices=["frozen", "finetune"])
    parser.add_argument("--precisions", nargs="+", default=["float32"],
                        choices=["float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--xla", nargs="+", default=["auto"], choices=["auto", "off", "on"],
                        help="jit_compile asked of Keras; the table also shows what Keras put in force")
    parser.add_argument("--inter-op", nargs="+", type=int, default=[0], help="0 is TensorFlow's default")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(**json.loads(args.spec))))
        return 0
    if args.quick:
        args.models, args.steps = ["mobilenetv3small@32"], 4
    rows = []
    for pair, phase, precision, xla, inter_op in itertools.product(args.models, args.phases, args.precisions,
                                                                   args.xla, args.inter_op):
        backbone, size = pair.split("@")
        spec = dict(backbone=backbone, size=int(size), phase=phase, precision=precision, xla=xla,
                    inter_op=inter_op, batch_size=args.batch_size, steps=args.steps)
        rows.append(run_isolated(__file__, ["--spec", json.dumps(spec)]))
        print(f"  measured {pair} {phase} {precision} XLA {xla} inter-op {inter_op or 'default'}: "
              f"{rows[-1]['images/s']:.1f} images/s (XLA in force: {rows[-1]['XLA in force']})", file=sys.stderr)
    print(f"# Training throughput (machine: {machine()}; {args.steps} timed batches after a warm-up)\n")
    print(table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
