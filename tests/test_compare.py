"""Comparing finished runs: grouped by dataset, labelled by what differs, seeds averaged; table and figure."""

import json
import re

import matplotlib
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from cifar100 import compare, plots
from cifar100.config import make_config

from .conftest import run_cli

matplotlib.use("Agg")


def fake_run(runs_dir, data_path, synthetic, top1, seconds=60.0, finished=True, test_top1=None, kind="cifar100",
             **settings):
    """A finished run folder as training leaves it: validation top-1 `top1` (test top-1 `test_top1`, by
    default the same), top-5 0.2 higher."""
    config = make_config("smoke", {"data_dir": data_path, "runs_dir": str(runs_dir), **settings})
    folder = config.run_dir()
    folder.mkdir(parents=True)
    config.save(folder / "config.json")
    results = {"run": config.run_name(), "backbone": config.backbone, "image_size": config.image_size,
               "data": {"kind": kind, "path": data_path, "synthetic": synthetic},
               "validation": {"top1": top1, "top5": min(1.0, top1 + 0.2)},
               "train_seconds_total": seconds, "train_images_per_second": 1000.0 / seconds}
    if finished:
        test_top1 = top1 if test_top1 is None else test_top1
        results["test"] = {"top1": test_top1, "top5": min(1.0, test_top1 + 0.2)}
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
    labels = [row.label for row in synthetic.rows]  # by validation top-1, best first: 54%, 45%, 40%
    assert labels == ["head_learning_rate=0.003, hem=False", "head_learning_rate=0.01, hem=False",
                      "head_learning_rate=0.003, hem=True"]
    seeds = next(row for row in synthetic.rows if len(row.runs) == 3)
    assert seeds.label == "head_learning_rate=0.003, hem=False"
    assert seeds.mean("validation.top1") == pytest.approx(0.54) and seeds.std("validation.top1") == pytest.approx(0.04)
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


def bars(ax) -> dict:
    """The heights of a panel's bars, by legend label."""
    return {c.get_label(): [round(bar.get_height(), 4) for bar in c] for c in ax.containers
            if isinstance(c, BarContainer)}


def table_rows(table: str, group_title: str) -> list[str]:
    """The lines of one dataset's block of the table, header first."""
    block = next(b for b in table.split("\n\n") if b.startswith(group_title))
    return [line for line in block.splitlines()[1:] if not line.startswith(("(", " "))]  # not the notes


def test_rows_are_ordered_and_valued_by_validation_top1_and_the_test_top1_is_reported_apart(tmp_path):
    # validation and test rank the two settings oppositely: validation chooses, test only reports
    fake_run(tmp_path, "/data/real", False, 0.50, test_top1=0.55)  # better on test
    fake_run(tmp_path, "/data/real", False, 0.60, test_top1=0.40, hem=True)  # better on validation
    groups = compare.group_runs(compare.find_runs(tmp_path))
    table = compare.format_table(groups)
    header, first, second = table_rows(table, "CIFAR-100 in /data/real")
    assert re.split(r"\s{2,}", header)[:3] == ["settings (what differs)", "runs", "val top-1"], header
    assert header.endswith("| test top-1 (report)")  # the last column, apart
    assert first.startswith("hem=True") and second.startswith("hem=False"), table  # best on validation first
    chosen, reported = first.split("| ")
    assert "60.00%" in chosen and "40.00%" not in chosen and reported == "40.00%"
    assert second.split("| ")[1] == "55.00%" and "55.00%" not in second.split("| ")[0]
    assert "choose settings by it" in table and "reports a choice already made" in table

    (ax,) = plots.compare_runs(groups).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["hem=True", "hem=False"]
    assert bars(ax) == {"validation top-1": [0.60, 0.50], "validation top-5": [0.80, 0.70]}
    (test,) = [line for line in ax.lines if line.get_label() == "test top-1, reported, not used to choose"]
    assert list(test.get_ydata()) == [0.40, 0.55] and test.get_linestyle() == "None"  # markers, not bars
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["validation top-1", "validation top-5", "test top-1, reported, not used to choose"]
    assert "validation" in ax.get_ylabel() and "Validation" in ax.figure.get_suptitle()


def test_a_run_folder_without_validation_numbers_is_skipped_in_one_line(runs, capsys):
    no_validation = fake_run(runs, "/data/syn", True, 0.3, seed=9)
    results = json.loads((no_validation / "results.json").read_text())
    del results["validation"]
    (no_validation / "results.json").write_text(json.dumps(results))
    found = compare.find_runs(runs)
    assert no_validation not in {run.folder for run in found} and len(found) == 6
    err = capsys.readouterr().err
    assert err == f"skipped: {no_validation / 'results.json'}: damaged results.json: no validation top1 and top5 " \
        "between 0 and 1\n"


def test_top5_is_left_out_for_ten_classes(tmp_path):
    fake_run(tmp_path, "/data/ten", False, 0.70, kind="cifar10")  # a results.json without the class count
    fake_run(tmp_path, "/data/ten", False, 0.60, kind="cifar10", hem=True)
    fake_run(tmp_path, "/data/hundred", False, 0.30)
    groups = compare.group_runs(compare.find_runs(tmp_path))
    table = compare.format_table(groups)
    assert "top-5" not in table_rows(table, "CIFAR-10 in /data/ten")[0]
    assert "val top-5" in table_rows(table, "CIFAR-100 in /data/hundred")[0]
    ten, hundred = plots.compare_runs(groups).axes[:2]  # cifar10 sorts before cifar100
    assert bars(ten) == {"validation top-1": [0.70, 0.60]}
    assert set(bars(hundred)) == {"validation top-1", "validation top-5"}
