"""dml.child_runs: the launcher the multi-run jobs share. A child's failure is one line (its
last line of standard error) with the command and all of its standard error in the log; a child
past its time is killed and says so; what a run logged is read back from its metrics.csv."""

import csv

from dml.child_runs import best_metric, launch, metric_values, step_losses


def test_a_failing_child_is_summed_up_by_its_last_error_line(tmp_path, capsys):
    log = tmp_path / "unit" / "unit.log"
    done = launch(["fit", "--no_such_key", "1"], label="trial 3", log=str(log))
    assert not done.ok and done.returncode == 2
    assert "no_such_key" in done.reason and "\n" not in done.reason
    out = capsys.readouterr().out
    assert f"trial 3 | FAILED: {done.reason} (all of its standard error: {log})" in out
    text = log.read_text()
    assert text.startswith("$ python -m dml fit --no_such_key 1\n")
    assert done.reason in text and text.rstrip().endswith("exit status 2")


def test_a_child_past_its_time_is_killed_and_says_so(tmp_path):
    done = launch(["fit"], log=str(tmp_path / "slow.log"), timeout=0.5)
    assert not done.ok and done.returncode < 0
    assert done.reason == "timed out after 0.5 s" and done.seconds < 30


def test_metrics_are_read_back_by_name_and_step(tmp_path):
    for name, rows in (("a", [(0, "0.5", ""), (1, "0.25", "0.1")]), ("b", [(0, "", "0.3")])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "train/loss", "val/MAP@R"])
            writer.writerows(rows)
    assert step_losses(str(tmp_path / "a")) == {0: 0.5, 1: 0.25}
    assert metric_values(str(tmp_path / "a"), "val/MAP@R") == [0.1]
    assert best_metric(str(tmp_path)) == 0.3  # over every run folder under it
    assert best_metric(str(tmp_path / "nowhere")) is None
