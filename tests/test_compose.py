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
    argv, path = merge_config_args(
        [
            "fit",
            "--config",
            a,
            "-c",
            b,
            "--model.loss.params.base",
            "0.4",
            "--trainer.max_epochs",
            "3",
        ],
        str(tmp_path / "out"),
    )
    assert argv == ["fit", "--config", path, "--trainer.max_epochs", "3"]
    with open(path) as f:
        assert yaml.safe_load(f) == {
            "model": {"loss": {"params": {"alpha": 2, "beta": 50, "base": 0.4}}}
        }


def test_overrides_before_a_later_file_are_folded_in_their_order(tmp_path):
    """``make train ARGS='--config layer.yaml'`` puts a file after --trainer.devices: the files
    still merge key by key, each override where it stood (a later file wins over it, it wins
    over an earlier one); overrides after the last file stay on the command line."""
    a = write(
        tmp_path,
        "a.yaml",
        {"x": 1, "model": {"pooling": {"name": "gsp", "params": {"gamma": 0.5}}}},
    )
    b = write(tmp_path, "b.yaml", {"x": 2, "model": {"pooling": {"params": {"m": 128}}}})
    out = str(tmp_path / "out")
    argv, path = merge_config_args(
        ["fit", "--config", a, "--x", "3", "--y=4", "--config", b, "--trainer.max_epochs", "3"], out
    )
    assert argv == ["fit", "--config", path, "--trainer.max_epochs", "3"]
    with open(path) as f:
        assert yaml.safe_load(f) == {
            "x": 2,
            "y": 4,
            "model": {"pooling": {"name": "gsp", "params": {"gamma": 0.5, "m": 128}}},
        }


def test_a_layer_that_selects_another_pooling_or_loss_drops_the_old_ones_arguments():
    base = {
        "model": {
            "pooling": {"name": "gsp", "params": {"gamma": 0.5}},
            "loss": {"name": "c2", "params": {"pos_margin": 0.2}},
        }
    }
    deep_merge(base, {"model": {"pooling": {"name": "my.Pool"}, "loss": {"params": {"a": 1}}}})
    assert base == {
        "model": {
            "pooling": {"name": "my.Pool"},
            "loss": {"name": "c2", "params": {"pos_margin": 0.2, "a": 1}},
        }
    }
    deep_merge(base, {"model": {"pooling": {"name": "gsp", "params": {"m": 8}}}})
    assert base["model"]["pooling"] == {"name": "gsp", "params": {"m": 8}}


def test_one_argument_of_a_term_is_set_where_no_layer_has_terms(tmp_path):
    a = write(tmp_path, "a.yaml", {"model": {"terms": None}})
    argv, path = merge_config_args(
        [
            "fit",
            "--config",
            a,
            "--model.terms.u.class_path",
            "m.U",
            "--model.terms.u.init_args.weight",
            "0.5",
        ],
        str(tmp_path / "out"),
    )
    with open(path) as f:
        assert yaml.safe_load(f) == {
            "model": {"terms": {"u": {"class_path": "m.U", "init_args": {"weight": 0.5}}}}
        }


def test_arguments_stay_as_they_are_when_order_matters_or_nothing_merges(tmp_path):
    a = write(tmp_path, "a.yaml", {"x": 1})
    b = write(tmp_path, "b.yaml", {"x": 2})
    out = str(tmp_path / "out")
    appended = ["fit", "--config", a, "--trainer.callbacks+=X", "--config", b]
    assert merge_config_args(appended, out) == (appended, None)  # cannot be a key of a file
    single = ["fit", "--config", a, "--trainer.max_epochs", "3"]
    assert merge_config_args(single, out) == (single, None)
    missing = ["fit", "--config", a, "--config", str(tmp_path / "nowhere.yaml")]
    assert merge_config_args(missing, out) == (missing, None)  # the CLI names the missing file
