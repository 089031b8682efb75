"""Layering config files: dicts merge key by key, everything else is replaced, and the order of
command-line arguments is kept where it matters."""
import yaml

from dml.compose import deep_merge, merge_config_args


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_deep_merge_merges_dicts_and_replaces_the_rest():
    base = {"model": {"loss": {"name": "c2", "params": {"a": 1, "b": 2}}, "dims": [1, 2]}}
    deep_merge(base, {"model": {"loss": {"params": {"b": 3}}, "dims": [4]}})
    assert base == {"model": {"loss": {"name": "c2", "params": {"a": 1, "b": 3}}, "dims": [4]}}
    data = {"data": {"class_path": "A", "init_args": {"size": 32, "root": "x"}}}
    deep_merge(data, {"data": {"init_args": {"root": "y"}}})
    assert data == {"data": {"class_path": "A", "init_args": {"size": 32, "root": "y"}}}
    deep_merge(data, {"data": {"class_path": "B", "init_args": {"root": "z"}}})
    assert data == {"data": {"class_path": "B", "init_args": {"root": "z"}}}  # a new class


def test_config_files_and_dict_overrides_become_one_file(tmp_path):
    a = write(tmp_path, "a.yaml", {"model": {"loss": {"params": {"alpha": 2, "beta": 40}}}})
    b = write(tmp_path, "b.yaml", {"model": {"loss": {"params": {"beta": 50}}}})
    argv, path = merge_config_args(["fit", "--config", a, "-c", b, "--model.loss.params.base",
                                    "0.4", "--trainer.max_epochs", "3"], str(tmp_path / "out"))
    assert argv == ["fit", "--config", path, "--trainer.max_epochs", "3"]
    with open(path) as f:
        assert yaml.safe_load(f) == {"model": {"loss": {"params": {"alpha": 2, "beta": 50,
                                                                   "base": 0.4}}}}


def test_arguments_stay_as_they_are_when_order_matters_or_nothing_merges(tmp_path):
    a = write(tmp_path, "a.yaml", {"x": 1})
    b = write(tmp_path, "b.yaml", {"x": 2})
    out = str(tmp_path / "out")
    interleaved = ["fit", "--config", a, "--trainer.max_epochs", "3", "--config", b]
    assert merge_config_args(interleaved, out) == (interleaved, None)
    single = ["fit", "--config", a, "--trainer.max_epochs", "3"]
    assert merge_config_args(single, out) == (single, None)
    missing = ["fit", "--config", a, "--config", str(tmp_path / "nowhere.yaml")]
    assert merge_config_args(missing, out) == (missing, None)  # the CLI names the missing file
