"""Every command the README shows runs: ``make`` targets as a dry run (``make -n``), every
``python -m ...`` entry point with ``--help``; every file or folder it names or links exists."""

import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TOP = ("dml/", "tests/", "docs/", "benchmarks/", "experiments/", "notebooks/", "examples/")


def readme_commands():
    """The command lines of the README's bash blocks, comments and continuations dropped."""
    text = open(README, encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = readme_commands()


def test_the_readme_shows_the_two_commands_and_the_entry_points():
    assert "make train" in COMMANDS and "make test" in COMMANDS
    assert any(c.startswith("python -m dml ") for c in COMMANDS)


def check(argv, **kwargs):
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, (argv, out.stdout[-1500:], out.stderr[-1500:])
    return out


@pytest.mark.parametrize("line", [c for c in COMMANDS if re.match(r"(\w+=\S+ )*make ", c)])
def test_each_make_command_is_a_valid_dry_run(line):
    words = shlex.split(line.replace("[", "").replace("]", "").replace("<run folder>", "x"))
    env_vars = [w for w in words[: words.index("make")] if "=" in w]
    args = words[words.index("make") + 1 :]
    env = dict(os.environ, **dict(v.split("=", 1) for v in env_vars))
    # -n: print the recipe, run nothing; -o: never rebuild the environment here
    check(["make", "-n", "-o", ".venv/.installed", *args], env=env)


@pytest.mark.parametrize(
    "module, sub",
    sorted(
        {
            (m.group(1), m.group(2) or "")
            for c in COMMANDS
            for m in [re.match(r"python3? -m ([\w.]+)(?: (\w+))?", c)]
            if m and m.group(1).startswith("dml")
        }
    ),
)
def test_each_python_entry_point_has_a_help(module, sub, monkeypatch, capsys):
    """In this process (``runpy``, as ``python -m`` runs it): the entry point prints its usage
    and exits 0."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", [module] + ([sub] if sub else []) + ["--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_every_path_the_readme_names_exists():
    text = open(README, encoding="utf-8").read()
    named = set(re.findall(r"\]\(([^)#\s]+)", text))  # markdown links
    named |= {t for t in re.findall(r"`([^`\s]+)`", text) if t.startswith(TOP)}
    named = {n for n in named if "://" not in n and "<" not in n and "*" not in n}
    assert named, "the README names no path"
    missing = sorted(n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, missing


@pytest.mark.parametrize("module", ["dml.tune", "dml.mlrc"])
def test_the_job_entry_points_name_themselves_and_list_the_valid_names(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} ")
    names = out.split("valid names:")[1]
    for name in ("omniglot_small", "xbm", "ccp_c2", "vit_s16_dino"):
        assert name in names


def test_make_train_prints_its_command_to_stderr_so_a_printed_config_is_plain_yaml(tmp_path):
    """``make train ARGS=--print_config > run.yaml`` gives the config Lightning would run and
    nothing else: the command line the recipe shows goes to stderr; ``make resume`` too."""
    import yaml

    out = check(
        [
            "make",
            "-s",
            "train",
            "SYSTEM_PYTHON=1",
            f"PYTHON={sys.executable}",
            "ARGS=--print_config",
        ],
        env=dict(os.environ, WANDB_MODE="disabled"),
    )
    config = yaml.safe_load(out.stdout)
    assert {"trainer", "model", "data"} <= set(config), out.stdout[:300]
    assert str(config["trainer"]["devices"]) == "1"
    assert "-m dml fit" in out.stderr and "--print_config" in out.stderr
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # --print_config reads no weights
    (run / "config.yaml").write_text(out.stdout)
    made = ["make", "-s", "SYSTEM_PYTHON=1", f"PYTHON={sys.executable}", "ARGS=--print_config"]
    out = check([*made, "resume", f"RUN={run}"], env=dict(os.environ, WANDB_MODE="disabled"))
    assert {"trainer", "model", "data"} <= set(yaml.safe_load(out.stdout)), out.stdout[:300]
    assert "--ckpt_path" in out.stderr and str(run / "config.yaml") in out.stderr


def test_the_first_run_install_writes_nothing_to_stdout(tmp_path):
    """On a new machine ``make train`` first installs the environment: that rule's commands
    and pip's output go to stderr, so ``make train ARGS=--print_config > run.yaml`` is plain
    YAML on a first run too. A stand-in interpreter plays pip and records its calls."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "pip output $*"\necho "$*" >> {tmp_path}/calls\n')
    python.chmod(0o755)
    out = check(["make", "-s", "venv", f"VENV={venv}"])
    assert out.stdout == ""
    assert "pip output -m pip install" in out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-1].startswith("-m pip install") and "-e .[dev,cpu]" in calls[-1], calls
    assert (venv / ".installed").exists()
