"""Break the code on purpose, one way at a time, and check that the test meant to catch it fails.

Each mutation below replaces one piece of code in a copy of the working tree (never this tree) and runs the
tests that guard that behaviour; a mutation that leaves them passing means a test that cannot fail.

    .venv/bin/python scripts/check_tests_can_fail.py              # every mutation (about 10 minutes on 2 cores)
    .venv/bin/python scripts/check_tests_can_fail.py --only xla   # those whose name contains "xla"
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAP = "train_idx = train_idx[stratified_subset(dataset.y_train[train_idx], cap, config.seed)]"

# name: (file, code as it is, code broken, tests that must fail)
MUTATIONS = {
    "lr scaled on one device (to a batch of 64)": (
        "cifar100/train.py", "    if config.reference_batch_size:\n",
        "    config = config.replace(reference_batch_size=64)\n    if config.reference_batch_size:\n",
        ["tests/test_training_levers.py::test_the_optimizer_gets_the_configured_rate_whatever_the_batch_size"]),
    "a compile other than the settings' trains under their name": (
        "cifar100/train.py", "        if changed:\n", "        if False:\n",
        ["tests/test_train.py::test_the_steps_of_a_phase_out_of_order_are_refused_and_train_nothing"]),
    "predictions in a last partial batch (a trace of its own)": (
        "cifar100/keras_internals.py", "    if not rest:  # full batches only (or no image)\n", "    if True:\n",
        ["tests/test_tf_log_lines.py::test_predictions_trace_one_batch_shape_and_equal_keras_own"]),
    "the augmentation shifts with RandomTranslation (XLA off)": (
        "cifar100/models.py", 'keras_internals.RandomShift(4, seed=seed + 1, name="random_shift")',
        'layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", seed=seed + 1, name="random_shift")',
        ["tests/test_training_levers.py::test_random_shift_moves_each_image_by_whole_pixels_and_compiles_with_xla"]),
    "a run folder's second hard link written through": (
        "cifar100/run_folder.py", "elif hard_links and (links := entry.stat(follow_symlinks=False).st_nlink) > 1:",
        "elif hard_links and (links := entry.stat(follow_symlinks=False).st_nlink) > 99:",
        ["tests/test_hostile_run_folders.py::test_a_file_of_several_hard_links_is_never_written_through"]),
    "an error in fit's first step held back with TensorFlow's lines": (
        "cifar100/__main__.py", '            sys.modules["cifar100.keras_internals"].release_held_stderr()\n',
        "            pass\n",
        ["tests/test_tf_log_lines.py::test_an_error_in_fits_first_step_is_shown_by_the_command_line"]),
    "a damaged committed backup removed (the phase restarts)": (
        "cifar100/run_folder.py", "    if committed is not None:\n        raise RunError(",
        "    if False:\n        raise RunError(",
        ["tests/test_run_folder.py::test_a_committed_backup_that_no_kill_could_leave_is_named_and_kept"]),
    "a backup outside the phase's epochs resumed": (
        "cifar100/run_folder.py", "    if not start_epoch <= committed <= end_epoch:\n", "    if False:\n",
        ["tests/test_run_folder.py::test_a_backup_outside_the_phase_or_a_history_without_its_epochs_is_refused_and_"
         "nothing_changes"]),
    "a history without the committed epochs' rows resumed (no best to beat)": (
        "cifar100/run_folder.py", '    if committed and (not rows or int(rows[-1]["epoch"]) < committed):',
        "    if False:",
        ["tests/test_run_folder.py::test_a_backup_outside_the_phase_or_a_history_without_its_epochs_is_refused_and_"
         "nothing_changes"]),
    "phase 1 recorded done without its weights trains again": (
        "cifar100/train.py", "        if done is not None and not ((self.run_dir / PHASE1_WEIGHTS).exists()",
        "        if False and not ((self.run_dir / PHASE1_WEIGHTS).exists()",
        ["tests/test_run_folder.py::test_phase_1_done_without_its_weights_or_after_more_epochs_than_it_has_is_"
         "refused"]),
    "a mining state of another length dropped": (
        "cifar100/mining.py", "if losses is None or losses.shape != self.losses.shape or", "if losses is None or",
        ["tests/test_hostile_run_folders.py::test_a_mining_state_that_does_not_fit_the_run_is_named_not_dropped"]),
    "error lines print a file's terminal escapes": (
        "cifar100/__main__.py", 'print(f"error: {printable(str(exc))}", file=sys.stderr)',
        'print(f"error: {exc}", file=sys.stderr)',
        ["tests/test_hostile_commands.py::test_names_from_files_print_without_terminal_escapes"]),
    "a 16-bit image clipped to white": (
        "cifar100/evaluate.py", 'image = _eight_bits(image, path).convert("RGB")', 'image = image.convert("RGB")',
        ["tests/test_hostile_commands.py::test_images_of_more_than_8_bits_are_scaled_or_refused"]),
    "xla auto decided here, off": (
        "cifar100/train.py", 'return "auto" if value == "auto" else value == "true"',
        'return False if value == "auto" else value == "true"',
        ["tests/test_config.py::test_xla_auto_is_left_to_keras"]),
    "bfloat16 policy ignored": (
        "cifar100/models.py", 'return "mixed_bfloat16"', 'return "float32"',
        ["tests/test_models.py::test_a_short_fit_under_mixed_bfloat16"]),
    "tf preprocessing scaled to [0, 1]": (
        "cifar100/models.py", "layers.Rescaling(1 / 127.5, offset=-1.0,", "layers.Rescaling(1 / 255.0,",
        ["tests/test_models.py::test_preprocessing_equals_keras_own"]),
    "caffe preprocessing keeps RGB": (
        "cifar100/models.py", 'np.eye(3, dtype="float32")[::-1]', 'np.eye(3, dtype="float32")',
        ["tests/test_models.py::test_preprocessing_equals_keras_own"]),
    "the inference model's Resizing left in training mode when called without `training`": (
        "cifar100/keras_internals.py", "    return layer(inputs, training=False)\n", "    return layer(inputs)\n",
        ["tests/test_models.py::test_the_inference_model_gives_predicts_probabilities_however_it_is_called"]),
    "best.keras holds the training model (augmentation inside)": (
        "cifar100/callbacks.py", "super().set_model(self.inference if self.inference is not None else model)",
        "super().set_model(model)",
        ["tests/test_use_a_model.py::test_the_saved_model_has_no_augmentation_and_calling_it_changes_nothing"]),
    "an exported form that disagrees with predict is kept": (
        "cifar100/evaluate.py", 'if checks[form]["top1_agrees"] < 1 or', "if False and",
        ["tests/test_use_a_model.py::test_export_refuses_a_form_that_disagrees_and_leaves_nothing"]),
    "a run folder of the earlier model format is read as a new one": (
        "cifar100/run_folder.py", 'and read_state(run_dir).get("model_format") != MODEL_FORMAT:', "and False:",
        ["tests/test_use_a_model.py::test_a_run_folder_of_the_earlier_model_format_is_refused_in_one_line"]),
    "links in a run folder followed": (
        "cifar100/run_folder.py", "                elif entry.is_symlink() or not", "                elif False and not",
        ["tests/test_hostile_run_folders.py::test_a_link_in_a_run_folder_is_refused_and_nothing_is_written_"
         "through_it"]),
    "an atomic write's temporary file written through a link": (
        "cifar100/run_folder.py", "    with contextlib.suppress(FileNotFoundError):\n        os.unlink(tmp)\n"
        "    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)\n",
        "    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n",
        ["tests/test_hostile_run_folders.py::test_an_atomic_write_replaces_a_link_and_its_temporary_file_never_"
         "writes_through_one"]),
    "a model file's size not bounded": (
        "cifar100/evaluate.py", "if len(members) > 64 or total > limit:", "if False:",
        ["tests/test_hostile_run_folders.py::test_a_model_file_holding_more_than_the_model_is_refused_before_it_"
         "is_read"]),
    "a torn last history row kept": (
        "cifar100/run_folder.py", 'and not lines[-1].endswith("\\n"):', "and False:",
        ["tests/test_hostile_run_folders.py::test_a_torn_last_row_of_the_history_is_dropped_and_a_damaged_one_is_"
         "named"]),
    "a diverged loss evaluated anyway": (
        "cifar100/train.py", "    if loss and not math.isfinite(float(loss)):", "    if False:",
        ["tests/test_hostile_run_folders.py::test_a_run_whose_loss_turns_nan_stops_in_one_line_before_the_"
         "evaluation"]),
    "data synthetic overwrites a dataset": (
        "cifar100/write_data.py", "    if existing:\n", "    if False:\n",
        ["tests/test_hostile_run_folders.py::test_data_synthetic_never_overwrites_a_dataset_and_checks_its_numbers"]),
    "superclasses from the run folder's classes.json": (
        "cifar100/evaluate.py", "dataset.class_names, dataset.fine_to_coarse,",
        'dataset.class_names, np.asarray(classes["fine_to_coarse"]),',
        ["tests/test_hostile_run_folders.py::test_classes_json_is_checked_and_superclasses_come_from_the_data"]),
    "cutmix label weight from the drawn lam, not the pasted area": (
        "cifar100/batches.py", "            lam = 1 - side * side / 1024\n", "",
        ["tests/test_batches.py::test_mixing_gives_each_label_the_share_of_the_image_it_has"]),
    "mixup labels unmixed": (
        "cifar100/batches.py", "return images, lam * labels + (1 - lam) * labels[partner]",
        "return images, labels",
        ["tests/test_batches.py::test_mixing_gives_each_label_the_share_of_the_image_it_has"]),
    "the layers' random streams overlap (a layer's index in Keras' counter slot)": (
        "cifar100/batches.py", "    return [key, 0]\n", "    return [epoch + 1, seed * 1_000_003 + layer]\n",
        ["tests/test_training_levers.py::test_each_random_layer_draws_a_stream_of_its_own_each_epoch"]),
    "selective backprop logs its scoring pass as the training loss": (
        "cifar100/mining.py",
        "        self.loss_metric.update_state(loss * replicas, sample_weight=tf.size(chosen))\n",
        "        self.loss_metric.update_state(tf.reduce_mean(losses), sample_weight=tf.size(chosen))\n",
        ["tests/test_mining.py::test_selective_backprop_logs_the_training_pass_as_loss_and_the_scoring_pass_apart"]),
    "history.csv counts epochs from 0": (
        "cifar100/callbacks.py", "        super().on_epoch_end(epoch + 1, logs)\n",
        "        super().on_epoch_end(epoch, logs)\n",
        ["tests/test_batches.py::test_history_counts_epochs_from_1_and_an_earlier_folder_is_renumbered_once"]),
    "TensorBoard logs an epoch again": (
        "cifar100/callbacks.py", "            if (split, f\"epoch-{epoch:06d}\") in written:", "            if False:",
        ["tests/test_run_folder.py::test_tensorboard_logs_each_committed_epoch_once_and_fills_in_one_left_out"]),
    "selective backprop's step does not scale the loss (mixed_float16)": (
        "cifar100/mining.py", "            scaled = model.optimizer.scale_loss(loss)\n", "            scaled = loss\n",
        ["tests/test_mining.py::test_selective_backprop_scales_the_loss_under_float16"]),
    "precision and XLA on without a GPU": (
        "cifar100/models.py", "        return bool(gpu_names())\n", "        return True\n",
        ["tests/test_config.py::test_precision_and_xla_follow_the_gpu_unless_asked"]),
    "cap not stratified": (
        "cifar100/data.py", CAP, "train_idx = train_idx[:cap]",
        ["tests/test_training_levers.py::test_the_cap_shrinks_training_not_validation"]),
    "cap taken before the validation split": (
        "cifar100/data.py", CAP, "train_idx = stratified_subset(dataset.y_train, cap, config.seed)",
        ["tests/test_training_levers.py::test_the_cap_shrinks_training_not_validation"]),
    "mirrored strategy falls back to one device": (
        "cifar100/distribution.py", "return tf.distribute.MirroredStrategy(devices), None",
        "return NoStrategy(), None",
        ["tests/test_distribution.py::test_mirrored_over_two_logical_cpus_matches_one_device"]),
    "restored epoch not forgotten": (
        "cifar100/keras_internals.py", "    model._initial_epoch = None\n", "    pass\n",
        ["tests/test_run_folder.py::test_keras_keeps_a_restored_epoch_for_later_fits_until_it_is_forgotten"]),
    "tf.data autotuning left on for fit's batches": (
        "cifar100/keras_internals.py", "    options.autotune.enabled = False\n", "",
        ["tests/test_batches.py::test_fit_input_reads_each_epochs_batches_as_the_sampler_then_makes_them_without_"
         "tf_data_autotuning"]),
    "fit's batches read ahead of the epoch (eagerly)": (
        "cifar100/keras_internals.py", "    def generate():\n        for index in range(len(batches)):\n"
        "            yield batches[index]\n",
        "    def generate(eager=[batches[i] for i in range(len(batches))]):\n        yield from eager\n",
        ["tests/test_batches.py::test_fit_input_reads_each_epochs_batches_as_the_sampler_then_makes_them_without_"
         "tf_data_autotuning"]),
    "progressive resizing ignored in training": (
        "cifar100/keras_internals.py", "        if not (training and self.training_size):\n", "        if True:\n",
        ["tests/test_training_levers.py::test_progressive_resizing_trains_small_first_and_validates_at_full_size"]),
    "a phase inherits the small size a stopped fit left": (
        "cifar100/models.py", "            upsample.training_size = None\n", "            pass\n",
        ["tests/test_training_levers.py::test_each_phase_starts_at_full_size_and_32_px_runs_get_the_layer_too"]),
    "early stopping counts the small epochs": (
        "cifar100/callbacks.py", "start_from_epoch=first_full,", "",
        ["tests/test_training_levers.py::test_with_progressive_resizing_early_stopping_watches_only_the_full_size_"
         "epochs"]),
    "resumed run forgets the mining state": (
        "cifar100/train.py", '        mining.set_state(restored.get("mining"))\n', "        pass\n",
        ["tests/test_run_folder.py::test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run"]),
    "phase 1 on cached features keeps a killed attempt's rows": (
        "cifar100/train.py", "does it again\n            (self.run_dir / run_folder.HISTORY).unlink(missing_ok=True)\n",
        "does it again\n            pass\n",
        ["tests/test_run_folder.py::test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run"]),
    "cached views drawn anew in each process": (
        "cifar100/batches.py", "np.random.default_rng([self.seed, epoch, 1])", "np.random.default_rng()",
        ["tests/test_training_levers.py::test_batches_of_cached_views_draw_one_view_of_each_example_per_epoch",
         "tests/test_run_folder.py::test_phase_2_on_cached_activations_stopped_resumes_to_the_uninterrupted_run"]),
    "a cut where two tensors cross (inside a residual block) taken": (
        "cifar100/models.py", "        if len(crossing) == 1 and names", "        if len(crossing) >= 1 and names",
        ["tests/test_training_levers.py::test_the_split_backbone_computes_the_model_and_cuts_where_one_tensor_"
         "crosses"]),
    "the fingerprint blind to the graph's connections": (
        "cifar100/models.py", "_edges(config, (list, tuple) if connections else list)", "_edges(config, list)",
        ["tests/test_models.py::test_the_fingerprint_follows_what_the_model_computes_not_its_names"]),
    "a folder fingerprinted by the earlier version refused": (
        "cifar100/run_folder.py", "not (earlier is not None and trained == earlier())", "not False",
        ["tests/test_run_naming.py::test_a_model_edited_in_the_notebook_trains_into_a_folder_of_its_own"]),
    "best.keras is the last epoch, not the best": (
        "cifar100/callbacks.py", "mode=\"max\", save_best_only=True,", "mode=\"max\", save_best_only=False,",
        ["tests/test_run_folder.py::test_best_keras_is_the_best_validation_epoch_not_the_last"]),
    "throughput reports the XLA asked as the XLA in force": (
        "benchmarks/throughput.py", '"XLA in force": "on" if model.jit_compile else "off"', '"XLA in force": xla',
        ["tests/test_benchmarks.py::test_throughput_quick_table"]),
    "image-size rows report plain accuracy as flip TTA": (
        "benchmarks/common.py", 'else f"{tta:.1%}"', "else f\"{test['top1']:.1%}\"",
        ["tests/test_benchmarks.py::test_run_rows_and_the_image_size_figure"]),
    "compare ranks settings by the test top-1": (
        "cifar100/compare.py", 'row: (-row.mean("validation.top1"), row.label)',
        'row: (-row.mean("test.top1"), row.label)',
        ["tests/test_compare.py::test_rows_are_ordered_and_valued_by_validation_top1_and_the_test_top1_is_"
         "reported_apart"]),
    "compare shows a run without validation numbers": (
        "cifar100/compare.py", '    for split in ("test", "validation"):\n', '    for split in ("test",):\n',
        ["tests/test_compare.py::test_a_run_folder_without_validation_numbers_is_skipped_in_one_line"]),
    "a phase fits without being compiled afresh": (
        "cifar100/train.py", " or model.optimizer is self.attempt[\"optimizer\"]:", ":",
        ["tests/test_train.py::test_the_steps_of_a_phase_out_of_order_are_refused_and_train_nothing"]),
    "an edited model trains into the recipe's folder": (
        "cifar100/models.py", 'return config.replace(model="" if found == recipe else found), found',
        'return config, found',
        ["tests/test_run_naming.py::test_a_model_edited_in_the_notebook_trains_into_a_folder_of_its_own"]),
    "a run of another model definition is taken as finished": (
        "cifar100/run_folder.py", "    if fingerprint is not None and trained not in (None, fingerprint) and",
        "    if False and",
        ["tests/test_run_naming.py::test_a_model_edited_in_the_notebook_trains_into_a_folder_of_its_own"]),
    "the fingerprint leaves out the layers' configuration": (
        "cifar100/models.py", "        parts = [type(layer).__name__, kept, _edges(",
        "        parts = [type(layer).__name__, {}, _edges(",
        ["tests/test_models.py::test_the_fingerprint_follows_what_the_model_computes_not_its_names"]),
    "the fingerprint holds the machine's precision": (
        "cifar100/models.py", 'and not (k == "dtype" and', "and not (False and",
        ["tests/test_models.py::test_the_fingerprint_follows_what_the_model_computes_not_its_names"]),
    "a skipped phase 1 keeps the weights the model came with": (
        "cifar100/train.py", "            self._start_phase1()\n            (self.run_dir", "            (self.run_dir",
        ["tests/test_run_naming.py::test_a_skipped_phase_1_starts_from_the_initial_weights_whatever_the_model_went_"
         "through"]),
    "a lock is rejoined after its folder was removed": (
        "cifar100/run_folder.py", "if key in _HELD and _same_file(_HELD[key][0], self.path):", "if key in _HELD:",
        ["tests/test_run_folder.py::test_the_lock_is_shared_within_a_process_and_released_with_its_last_holder"]),
    "the guard misses a cell that uses the settings": (
        "cifar100/notebook.py", "        node.body[:0] = call\n", "",
        ["tests/test_notebook_helpers.py::test_every_cell_that_uses_the_settings_is_checked_without_a_line_of_its_"
         "own"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only the mutations whose name contains this")
    args = parser.parse_args(argv)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    rows, broken_tests = [], 0
    with tempfile.TemporaryDirectory(prefix="broken-build-") as tmp:
        copy = Path(tmp)
        for name in files:
            if (ROOT / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, copy / name)
        for name, (path, good, bad, tests) in MUTATIONS.items():
            if args.only not in name:
                continue
            original = (copy / path).read_text()
            if original.count(good) != 1:
                rows.append((name, "the code to break was not found once: update this script", ""))
                broken_tests += 1
                continue
            (copy / path).write_text(original.replace(good, bad))
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                     "-m", "", *tests], cwd=copy, capture_output=True, text=True)
            (copy / path).write_text(original)
            caught = result.returncode == 1 and " failed" in result.stdout
            broken_tests += not caught
            summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
            rows.append((name, "caught" if caught else f"NOT CAUGHT ({summary})",
                         f"{', '.join(t.split('::')[-1] for t in tests)} ({time.perf_counter() - started:.0f} s)"))
            print(f"{name}: {rows[-1][1]}", file=sys.stderr)
    print("| mutation | result | tests |\n|---|---|---|")
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows))
    return 1 if broken_tests else 0


if __name__ == "__main__":
    sys.exit(main())
