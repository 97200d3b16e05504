"""Can the tests fail? Each mutation below breaks one guarantee of the library; the tests named with it must then
fail. For each: the repository's files (git ls-files, tracked and untracked-not-ignored) are copied to a temporary
folder, the old text (found exactly once, or this script stops) is replaced, and only the named tests run there,
with this repository's .venv python and PYTHONPATH on the copy, first unmutated (they must pass), then mutated.
caught: the mutated tests failed; MISSED: they passed; PENDING: a test file named is not written yet.

    .venv/bin/python scripts/check_tests_can_fail.py [--only SUBSTRING] [--list]     # exit 1 if any is MISSED
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
HOSTILE = "tests/test_data.py::test_hostile_file_is_refused_in_one_line"

# (name, file, old text, new text, pytest arguments: node ids, or a file with -k EXPRESSION)
MUTATIONS = [
    ("data: find_class allows any global", "cifar100/safe_pickle.py", "        if (module, name) not in allowed:\n",
     "        if (module, name) not in allowed:\n            return super().find_class(module, name)\n",
     [f"{HOSTILE}[os-system]", f"{HOSTILE}[builtins-eval]", f"{HOSTILE}[subprocess-run]"]),
    ("data: the memory budget is never spent", "cifar100/safe_pickle.py", "        self.budget -= size\n",
     "        self.budget -= 0\n", [f"{HOSTILE}[bytes-reused-by-memo]"]),
    ("data: no md5 check", "cifar100/data.py", "            if found != MD5[file]:", "            if False:",
     ["tests/test_data.py::test_without_a_marker_the_files_are_md5_checked"]),
    ("config: no range check", "cifar100/config.py", "or not low <= value <= high ", "",
     ["tests/test_config.py", "-k", "cannot_work or from_dict_validates"]),
    ("config: no backbone minimum size", "cifar100/config.py", "    if config.image_size < minimum:",
     "    if False:", ["tests/test_config.py", "-k", "cannot_work"]),
    ("runs: write_atomic writes in place (through a link)", "cifar100/runs.py", "        os.replace(temporary, path)",
     "        Path(path).write_bytes(Path(temporary).read_bytes())",
     ["tests/test_runs.py::test_the_writer_replaces_a_link_and_never_writes_through_it"]),
    ("runs: _canonical keeps Keras' names", "cifar100/runs.py",
     '            return "/".join(names.get(part, part) for part in node.split("/"))', "            return node",
     ["tests/test_runs.py::test_the_same_recipe_finds_the_same_folder_whatever_keras_named_its_layers"]),
    ("runs: the lock is not taken", "cifar100/runs.py", "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "pass", ["tests/test_runs.py::test_a_run_folder_is_locked_while_another_process_trains_it"]),
    ("runs: a compressed checkpoint is unpacked whatever its size", "cifar100/runs.py",
     "            if sum(info.file_size for info in members) > len(raw):", "            if False:",
     ["tests/test_runs.py::test_a_compressed_checkpoint_bomb_is_refused_before_it_is_unpacked"]),
    ("evaluate: a function in a model's config is loaded", "cifar100/evaluate.py",
     ' and name != "__lambda__"', "", ["tests/test_evaluate.py", "-k", "lambda"]),
    ("evaluate: no declared-bytes check", "cifar100/evaluate.py",
     '    if needed > sizes["model.weights.h5"] + SLACK:', "    if False:",
     ["tests/test_evaluate.py", "-k", "bloated"]),
    ("callbacks: mining sets no weights", "cifar100/callbacks.py", "        batches.weights[chosen] = self.floor",
     "        _ = self.floor", ["tests/test_training.py::test_hard_example_mining_weights_the_examples_of_larger_"
                                "cross_entropy_up"]),
    ("callbacks: the restored callback state is not applied", "cifar100/callbacks.py",
     "                    setattr(callback, name, saved[_key(index, callback, name)])", "                    pass",
     ["tests/test_training.py", "-k", "counters"]),
    ("runs: a phase started again keeps what an interrupt left", "cifar100/runs.py",
     '        if (folder / "checkpoint.npz").exists():\n            self._restore(folder / "checkpoint.npz")',
     "        if False:\n            pass",
     ["tests/test_runs.py::test_a_phase_started_again_restores_its_last_finished_epoch_over_what_an_interrupt_left"]),
    ("runs: phase 2 starts on an unfinished phase 1", "cifar100/runs.py",
     'not self.state["done"] and self.config.head_epochs:', "False:",
     ["tests/test_runs.py::test_phase_2_is_refused_while_phase_1_is_unfinished"]),
    ("runs: an array header's size is not checked", "cifar100/runs.py",
     " or math.prod(shape) * dtype.itemsize > info.file_size", "",
     ["tests/test_runs.py::test_an_array_header_declaring_more_than_its_data_is_refused_before_it_is_allocated"]),
    ("evaluate: any zip member is accepted", "cifar100/evaluate.py", " <= set(sizes) <= MEMBERS", " <= set(sizes)",
     ["tests/test_evaluate.py", "-k", "extra"]),
    ("batches: the random streams are not set per epoch", "cifar100/batches.py",
     "            state.assign(np.array([key, 0], dtype=state.dtype))", "            pass",
     ["tests/test_training.py::test_a_killed_run_resumes_to_the_uninterrupted_result"]),
    ("batches: the epoch order ignores the epoch", "cifar100/batches.py",
     "default_rng([self.seed, epoch])", "default_rng([self.seed, 0])",
     ["tests/test_training.py::test_each_epoch_reads_another_order_and_the_same_epoch_the_same_one"]),
    ("report: seeds' best instead of their mean", "cifar100/report.py", '"val": val.mean(),', '"val": val.max(),',
     ["tests/test_report.py::test_compare_averages_seeds_labels_what_differs_and_skips_damaged_runs"]),
]


def apply(root: Path, file: str, old: str, new: str) -> None:
    text = (root / file).read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{file}: the old text is found {text.count(old)} times, not once (the code changed; "
                         f"update the mutation):\n{old}")
    (root / file).write_text(text.replace(old, new))


def copy_repository(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and "__pycache__" not in source.parts:  # staged or unstaged deletions are skipped
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def test_files(tests: list[str]) -> list[str]:
    return [t.split("::")[0] for t in tests if t.startswith("tests/")]


def check(name, file, old, new, tests, timeout, baseline=True) -> str:
    missing = [t for t in test_files(tests) if not (ROOT / t).exists()]
    if missing:
        return f"PENDING: {', '.join(missing)} not written yet"
    with tempfile.TemporaryDirectory(prefix="mutant-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [str(PYTHON), "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        for mutated in (False, True) if baseline else (True,):
            if mutated:
                apply(copy, file, old, new)
            try:
                done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"ERROR: the tests ran past {timeout:.0f} s{' (mutated)' * mutated}"
            if not mutated and done.returncode != 0:
                return f"ERROR: the tests fail unmutated (pytest exit {done.returncode}):\n" + done.stdout[-1500:]
    if done.returncode in (0, 1):
        return "MISSED" if done.returncode == 0 else "caught"
    return f"ERROR: pytest exit {done.returncode}:\n" + (done.stdout + done.stderr)[-1500:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="the mutations whose name or file holds SUBSTRING")
    parser.add_argument("--list", action="store_true", help="list the mutations and check their old texts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run of a mutation's tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests unmutated first")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only in m[0] or args.only in m[1]]
    failed = 0
    for name, file, old, new, tests in chosen:
        if args.list:
            found = (ROOT / file).read_text().count(old)
            pending = [t for t in test_files(tests) if not (ROOT / t).exists()]
            print(f"{name} [{file}: old text found {found}x{', PENDING ' + ', '.join(pending) if pending else ''}]"
                  f"\n    {shlex.join(tests)}")
            failed += found != 1
            continue
        started = time.perf_counter()
        outcome = check(name, file, old, new, tests, args.timeout, not args.no_baseline)
        failed += outcome.startswith(("MISSED", "ERROR"))
        status, _, detail = outcome.partition(": ")
        print(f"{status:>8}  {name} ({time.perf_counter() - started:.0f} s)"
              + "".join(f"\n          {line}" for line in detail.splitlines() if line.strip()), flush=True)
    print(f"{len(chosen)} mutations, {failed} {'with a stale old text' if args.list else 'missed or errors'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
