"""Comparing finished runs: grouped by dataset, labelled by what differs, seeds averaged; table and figure."""

import json

import matplotlib
import pytest
from matplotlib.container import ErrorbarContainer

from cifar100 import compare, plots
from cifar100.config import make_config

from .conftest import run_cli

matplotlib.use("Agg")


def fake_run(runs_dir, data_path, synthetic, top1, seconds=60.0, finished=True, **settings):
    config = make_config("smoke", {"data_dir": data_path, "runs_dir": str(runs_dir), **settings})
    folder = config.run_dir()
    folder.mkdir(parents=True)
    config.save(folder / "config.json")
    results = {"run": config.run_name(), "backbone": config.backbone, "image_size": config.image_size,
               "data": {"kind": "cifar100", "path": data_path, "synthetic": synthetic},
               "train_seconds_total": seconds, "train_images_per_second": 1000.0 / seconds}
    if finished:
        results["test"] = {"top1": top1, "top5": min(1.0, top1 + 0.2)}
        (folder / "state.json").write_text('{"finished": true}')
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def runs(tmp_path):
    for seed, top1 in ((0, 0.50), (1, 0.54), (2, 0.58)):
        fake_run(tmp_path, "/data/syn", True, top1, seed=seed)
    fake_run(tmp_path, "/data/syn", True, 0.40, hem=True)
    fake_run(tmp_path, "/data/syn", True, 0.45, head_learning_rate=0.01)
    fake_run(tmp_path, "/data/syn", True, 0.99, finished=False, batch_size=8)  # not finished: not shown
    fake_run(tmp_path, "/data/real", False, 0.30, seconds=600.0)
    return tmp_path


def test_runs_are_grouped_by_dataset_and_labelled_by_what_differs(runs):
    groups = compare.group_runs(compare.find_runs(runs))
    assert [(g.path, g.synthetic) for g in groups] == [("/data/real", False), ("/data/syn", True)]
    real, synthetic = groups
    assert [row.label for row in real.rows] == [real.rows[0].runs[0].name]  # alone on its data: its folder name
    labels = sorted(row.label for row in synthetic.rows)
    assert labels == ["head_learning_rate=0.003, hem=False", "head_learning_rate=0.003, hem=True",
                      "head_learning_rate=0.01, hem=False"]
    seeds = next(row for row in synthetic.rows if len(row.runs) == 3)
    assert seeds.label == "head_learning_rate=0.003, hem=False"
    assert seeds.mean("top1") == pytest.approx(0.54) and seeds.std("top1") == pytest.approx(0.04)
    assert real.rows[0].mean("train_seconds_total") == 600.0


def test_runs_of_one_seed_are_not_called_seeds_in_the_table_nor_in_the_figure(tmp_path):
    # `make demo` (RUN_NAME demo) and the auto-named run of the same settings: two runs, one seed
    fake_run(tmp_path, "/data/syn", True, 0.50, name="demo")
    fake_run(tmp_path, "/data/syn", True, 0.52)
    for seed in (0, 1, 2):
        fake_run(tmp_path, "/data/syn", True, 0.40, seed=seed, hem=True)
    groups = compare.group_runs(compare.find_runs(tmp_path))
    table = compare.format_table(groups)
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "mean of 2 runs, 1 seed " in lines["hem=False"] and "mean of 3 seeds" in lines["hem=True"], table
    ticks = [t.get_text() for t in plots.compare_runs(groups).axes[0].get_xticklabels()]
    assert sorted(ticks) == ["hem=False\n(mean of 2 runs, 1 seed)", "hem=True\n(mean of 3 seeds)"]


def test_the_table_and_the_command_line_show_the_same(runs):
    table = compare.format_table(compare.group_runs(compare.find_runs(runs)))
    assert "SYNTHETIC" in table and "CIFAR-100 in /data/real: 1 run(s)" in table
    assert "54.00% ± 4.00%" in table and "3 seeds" in table and "10m00s" in table
    assert "batch_size" not in table  # the unfinished run
    result = run_cli("compare", str(runs))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == table.strip()


def test_the_figure_has_a_panel_per_dataset_error_bars_and_a_legend_that_hides_no_bar(runs):
    groups = compare.group_runs(compare.find_runs(runs))
    figure = plots.compare_runs(groups, current=groups[1].rows[0].runs[0].name)
    real_ax, synthetic_ax = figure.axes[:2]
    assert "SYNTHETIC" in synthetic_ax.get_title() and "SYNTHETIC" not in real_ax.get_title()
    ticks = [t.get_text() for t in synthetic_ax.get_xticklabels()]
    assert any("hem=True" in t for t in ticks) and any("mean of 3 seeds" in t for t in ticks)
    assert any(t.get_fontweight() == "bold" for t in synthetic_ax.get_xticklabels())
    assert any(isinstance(c, ErrorbarContainer) for c in synthetic_ax.containers)  # the std over seeds
    assert not any(isinstance(c, ErrorbarContainer) for c in real_ax.containers)  # one seed: no error bar
    figure.canvas.draw()
    for ax in (real_ax, synthetic_ax):
        legend = ax.get_legend().get_window_extent()
        assert not any(legend.overlaps(bar.get_window_extent()) for bar in ax.patches)
    assert matplotlib.pyplot.get_fignums() == []  # closed in pyplot: a notebook shows it once, when returned


def test_no_runs(tmp_path):
    assert compare.format_table(compare.group_runs(compare.find_runs(tmp_path))) == "no finished runs found"
    assert plots.compare_runs([]).axes[0].texts[0].get_text() == "no finished runs found"


def test_a_damaged_run_folder_is_named_and_the_others_are_still_compared(runs, capsys):
    damaged = fake_run(runs, "/data/syn", True, 0.3, seed=7)
    (damaged / "results.json").write_text('{"run": ')
    no_numbers = fake_run(runs, "/data/syn", True, 0.3, seed=8)
    (no_numbers / "results.json").write_text('{"test": {"top1": "hi"}}')
    found = compare.find_runs(runs)
    assert not {damaged, no_numbers} & {run.folder for run in found} and len(found) >= 6
    err = capsys.readouterr().err
    assert f"skipped: {damaged / 'results.json'}: damaged results.json" in err
    assert f"skipped: {no_numbers / 'results.json'}: damaged results.json: no test top1 and top5 between 0 and 1" in err
