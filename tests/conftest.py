import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from cifar100 import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v3_small_1.0_imagenet_notop.weights.h5"


@pytest.fixture(scope="session")
def synthetic_cifar100(tmp_path_factory) -> Path:
    """A small SYNTHETIC CIFAR-100 folder in the official format (read-only for tests)."""
    return data.write_synthetic(tmp_path_factory.mktemp("syn") / "cifar-100-python", n_train=1000, n_test=200)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """`python -m cifar100 ARGS` in a subprocess, finished."""
    return subprocess.run([sys.executable, "-m", "cifar100", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)
