import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from cifar100 import write_data

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE_DIR = SHARED / "data" / "cifar100-test-sample"
WEIGHTS_DIR = SHARED / "weights"


@pytest.fixture(scope="session")
def synthetic_cifar100(tmp_path_factory) -> Path:
    """A small synthetic CIFAR-100 folder in the official format (read-only for tests)."""
    return write_data.write_synthetic(tmp_path_factory.mktemp("syn") / "cifar-100-python", n_train=1000, n_test=200)


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory, synthetic_cifar100) -> Path:
    """A run folder of the smoke preset, untrained (for tests that need its files, not its accuracy). Tests
    that change it work on a copy."""
    from cifar100 import data, models, run_folder, train
    from cifar100.config import make_config

    run = tmp_path_factory.mktemp("runs") / "run"
    run.mkdir()
    config = make_config("smoke", {"data_dir": str(synthetic_cifar100)})
    config.save(run / "config.json")
    models.build_model(config, num_classes=100).save(run / "best.keras")
    train.save_class_info(run, data.load(synthetic_cifar100))
    run_folder.write_state(run, model_format=run_folder.MODEL_FORMAT)
    return run


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cifar100 ARGS` in a subprocess and return the finished process."""
    return subprocess.run([sys.executable, "-m", "cifar100", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture
def serve():
    """serve(payload) -> (url, md5, requests): the payload over HTTP on loopback; `requests` lists the paths
    asked for."""
    servers, requests = [], []

    def start(payload: bytes, name: str = "a.tar.gz"):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/{name}", hashlib.md5(payload).hexdigest(), requests

    yield start
    for server in servers:
        server.shutdown()
