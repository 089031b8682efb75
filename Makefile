# Two commands set everything up on a new machine: `make train` and `make test`.
# Both create the virtual environment (.venv, `pip install -e .[dev,cpu]`) the first time.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
FAISS ?= cpu
# the tested environment's pins (constraints.txt, `make lock`); the GPU route resolves its own
# CUDA stack, unpinned. LOCK= (empty) installs unpinned on any route.
ifeq ($(FAISS),cpu)
LOCK ?= constraints.txt
else
LOCK ?=
endif
# TORCH_INDEX=https://download.pytorch.org/whl/cpu: torch and torchvision from that index first
# (PyTorch's CPU-only wheels: no CUDA libraries, about 3 GB less in .venv); empty: PyPI's.
TORCH_INDEX ?=
# SYSTEM_PYTHON=1: run with $(PYTHON) as it is, no .venv (an image that already holds the
# requirements, e.g. an offline GPU node with the wheels of benchmarks/README.md installed)
ifeq ($(SYSTEM_PYTHON),1)
PY := $(PYTHON)
INSTALLED :=
else
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
endif
DATASET ?= synthetic
METHOD ?= baseline
# empty: the data set's backbone; vit_s16_dino: experiments/backbone/vit_s16_dino*.yaml on top
BACKBONE ?=
DEVICES ?= 1
ARGS ?=
# The config files of a run: trainer + data + [protocol] + method + [family] + [method/data], the
# rule of dml/compose.py (python -m dml.compose DATASET METHOD [BACKBONE] prints them).

DATA_ROOT ?= data/$(DATASET)

.PHONY: train zero-shot resume lint lock test table data data-check bench-eval gpu-check gpu-bench notebook embed index search export mlrc docs docs-serve venv clean help

help:
	@echo "make train [DATASET=synthetic] [METHOD=baseline] [BACKBONE=vit_s16_dino] [DEVICES=1] [ARGS='--trainer.max_epochs 5']"
	@echo "make zero-shot [DATASET=synthetic] [BACKBONE=vit_s16_dino] [METHOD=baseline] [ARGS=...]   the untrained backbone's pooled features on the test split (no training, no head)"
	@echo "make resume RUN=runs/<run folder> [ARGS='--trainer.max_epochs 60']   continue from its last.ckpt"
	@echo "make test [TEST_WORKERS=2]   the test suite (TEST_WORKERS=0: in one process)"
	@echo "make lock       refresh constraints.txt (the pinned, tested environment make venv installs)"
	@echo "make lint       ruff check + ruff format --check + mypy (dml.metrics, dml.inference, dml.evaluation)"
	@echo "make table [DATASET=omniglot_small] [SEEDS='0 1 2'] [DEVICES=1]   methods-vs-baselines grid -> experiments/results/"
	@echo "make embed|index|search|export ARGS='...'   python -m dml <command> ARGS (docs/usage.md)"
	@echo "make notebook   JupyterLab on notebooks/ (installs the notebook extra)"
	@echo "make docs       build the documentation into site/ (mkdocs --strict); make docs-serve: live preview"
	@echo "make gpu-check [ARGS='--methods xbn ccp_c2']   on a CUDA machine: every method in bf16, resume, GPU evaluation, DDP"
	@echo "make gpu-bench [BENCH_OUT=runs/gpu-bench-<time>] [ARGS='--parts eval loader']   on a CUDA machine: every GPU figure of benchmarks/README.md in <= 8 min"
	@echo "make mlrc DATASET=cub METHOD=gsp_contrastive [SEEDS='0'] [DEVICES=1] [ARGS='--epochs 4 -- --model.optimizer.lr 1e-5']   MLRC protocol -> experiments/results/<dataset>/mlrc/"
	@echo "make data DATASET=cub|sop|omniglot [DATA_ROOT=data/<name>]   download and verify"
	@echo "make data-check DATASET=<name> DATA_ROOT=<path> [DECODE=1]   parse, print split sizes (DECODE: open every image)"
	@echo "data sets: $$(ls experiments/data | sed 's/.yaml//' | tr '\n' ' ')"
	@echo "methods:   $$(ls experiments/method/*.yaml | xargs -n1 basename | sed 's/.yaml//' | tr '\n' ' ')"
	@echo "backbones: $$(ls experiments/backbone/*.yaml | xargs -n1 basename | sed 's/.yaml//' | tr '\n' ' ')"

# Its commands and their output go to stderr, so that on a first run `make train
# ARGS=--print_config > run.yaml` still writes plain YAML.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	@set -ex; exec 1>&2; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	$(PY) -m pip install --upgrade pip; \
	$(if $(TORCH_INDEX),$(PY) -m pip install $(if $(LOCK),-c $(LOCK)) --index-url $(TORCH_INDEX) torch torchvision;) \
	$(PY) -m pip install $(if $(LOCK),-c $(LOCK)) -e ".[dev,$(FAISS)]"; \
	touch $@

# constraints.txt from a fresh resolution of setup.cfg's requirements (dev + cpu extras)
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e ".[dev,cpu]"
	{ echo "# The tested environment (CPU route): make train / make test install with these pins"; \
	  echo "# (pip install -c constraints.txt -e \".[dev,cpu]\"). Refresh with \`make lock\`; \`make venv LOCK=\`"; \
	  echo "# installs unpinned. Generated $$(date +%F) on Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -sm)."; \
	  .lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

venv: $(VENV)/.installed

train: $(INSTALLED)
	@configs=$$($(PY) -m dml.compose $(DATASET) $(METHOD) $(BACKBONE)) || exit 2; \
	name=$(DATASET)-$(METHOD)$(if $(BACKBONE),-$(BACKBONE)); \
	echo "$(PY) -m dml fit $$configs --trainer.devices $(DEVICES) --run_name $$name $(ARGS)" >&2; \
	$(PY) -m dml fit $$configs --trainer.devices $(DEVICES) --run_name $$name $(ARGS)

# The zero-shot reference row (python -m dml test --zero-shot, docs/evaluation.md): the data
# set's backbone (BACKBONE's when given) with its configured weights (pretrained, or random on
# synthetic and Omniglot), no training, no head: its pooled features (METHOD=baseline: GAP),
# L2-normalised, on the test split, through the same evaluation as `python -m dml test`.
zero-shot: METHOD = baseline
zero-shot: $(INSTALLED)
	@configs=$$($(PY) -m dml.compose $(DATASET) $(METHOD) $(BACKBONE)) || exit 2; \
	name=$(DATASET)-zero-shot$(if $(BACKBONE),-$(BACKBONE)); \
	echo "$(PY) -m dml test $$configs --zero-shot --trainer.devices $(DEVICES) --run_name $$name $(ARGS)" >&2; \
	$(PY) -m dml test $$configs --zero-shot --trainer.devices $(DEVICES) --run_name $$name $(ARGS)

# Continue a run in its own folder from its last.ckpt (the config is checked against it).
resume: $(INSTALLED)
	@test -n "$(RUN)" || { echo "usage: make resume RUN=runs/<run folder> [ARGS=...]" >&2; exit 2; }
	@test -f "$(RUN)/checkpoints/last.ckpt" || { echo "no $(RUN)/checkpoints/last.ckpt" >&2; exit 2; }
	@echo '$(PY) -m dml fit --config "$(RUN)/config.yaml" --ckpt_path "$(RUN)/checkpoints/last.ckpt" $(ARGS)' >&2
	@$(PY) -m dml fit --config "$(RUN)/config.yaml" --ckpt_path "$(RUN)/checkpoints/last.ckpt" $(ARGS)

# The suite in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (its
# module fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
# ruff (lint + format check, pyproject.toml) and mypy on the public API; CI runs it first
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: $(INSTALLED)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

# The grid of dml/reproduce.py; omniglot_small (CPU budget) unless DATASET is given.
table: DATASET = omniglot_small
SEEDS ?= 0 1 2
table: $(INSTALLED)
	$(PY) -m dml.reproduce --dataset $(DATASET) --seeds $(SEEDS) --devices $(DEVICES) $(ARGS)

data: $(INSTALLED)
	$(PY) -m dml.data.download $(DATASET) "$(DATA_ROOT)"

data-check: $(INSTALLED)
	$(PY) -m dml.data.check $(DATASET) "$(DATA_ROOT)" $(if $(DECODE),--decode)

bench-eval: $(INSTALLED)
	$(PY) benchmarks/eval_speed.py

# The MLRC protocol (dml/mlrc.py): 4 fold models, test-split metrics separated and concatenated.
mlrc: SEEDS = 0
mlrc: $(INSTALLED)
	$(PY) -m dml.mlrc --dataset $(DATASET) --method $(METHOD) $(if $(BACKBONE),--backbone $(BACKBONE)) --seeds $(SEEDS) --devices $(DEVICES) $(ARGS)

# Using a trained model (dml/inference/cli.py): make embed ARGS='CKPT --split test --out t.npz'
embed index search export: $(INSTALLED)
	$(PY) -m dml $@ $(ARGS)

# JupyterLab on the notebooks (the notebook extra: jupyterlab, ipykernel).
notebook: $(INSTALLED)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -e ".[dev,$(FAISS),notebook]"
	$(PY) -m jupyterlab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)  # root: a container

# The documentation (mkdocs.yml, docs/): a strict build fails on any warning, a citation of a
# missing docs/ page included (docs/hooks/check_citations.py).
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# The GPU acceptance run (dml/gpu_check.py); says so and exits 0 on a machine without CUDA.
gpu-check: $(INSTALLED)
	$(PY) -m dml.gpu_check $(ARGS)

# Every GPU measurement in one call of at most 8 minutes (benchmarks/gpu_bench.py): a table and
# a JSON file in BENCH_OUT; exits 1 on a failed check. Says so and exits 0 without CUDA.
BENCH_OUT ?= runs/gpu-bench-$(shell date +%Y%m%d-%H%M%S)
gpu-bench: $(INSTALLED)
	$(PY) benchmarks/gpu_bench.py --out $(BENCH_OUT) $(ARGS)

clean:
	rm -rf runs lightning_logs .pytest_cache
