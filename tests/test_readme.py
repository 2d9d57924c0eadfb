"""The README's claims that code can check: the preset table and the two commands CI relies on."""

from pathlib import Path

from distillkac.presets import hyperparameter_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_preset_table_matches_the_presets():
    assert hyperparameter_table() in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
