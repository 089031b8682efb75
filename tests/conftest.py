"""Tests read configs under experiments/ by relative path: run them from the repository root
whatever directory pytest was started in."""

import os

os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("WANDB_MODE", "disabled")
