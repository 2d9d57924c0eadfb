"""The README's claims that code can check: the preset table, the two commands CI relies on, and the maths
example, which runs as printed."""

import re
from pathlib import Path

import torch

from distillkac.presets import hyperparameter_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_preset_table_matches_the_presets():
    assert hyperparameter_table() in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_maths_example_runs_as_printed():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"The maths underneath:\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["x_0"].shape == (16, 3, 32, 32) and torch.isfinite(namespace["x_0"]).all()
    assert namespace["x_T"].abs().max() <= 3.0  # Kac noise never leaves [-cT, cT]
