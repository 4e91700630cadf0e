"""docs/cli.md and docs/trainers.md are what scripts/render_docs.py renders from the code; its --check notices a stale
page; the trainer names the trainer page gives as examples resolve through nnU-Net's own lookup."""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER_DOCS = os.path.join(REPO, "scripts", "render_docs.py")


@pytest.fixture(scope="module")
def render_docs():
    """scripts/render_docs.py as a module."""
    spec = importlib.util.spec_from_file_location("render_docs", RENDER_DOCS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_are_up_to_date():
    """``python scripts/render_docs.py --check`` from the repository root, as a developer runs it."""
    result = subprocess.run(
        [sys.executable, RENDER_DOCS, "--check"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_a_stale_page(render_docs, tmp_path, monkeypatch, capsys):
    for name in render_docs.PLACEHOLDER_ENV:  # rendering sets them: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    assert render_docs.main(["--out", str(tmp_path)]) == 0
    stale = tmp_path / "trainers.md"
    lines = stale.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[0] = "# Trainers, edited by hand\n"
    stale.write_text("".join(lines), encoding="utf-8")
    capsys.readouterr()
    assert render_docs.main(["--check", "--out", str(tmp_path)]) == 1
    output = capsys.readouterr().out
    assert f"{stale}: stale" in output and "-# Trainers, edited by hand" in output and "cli.md" not in output
    assert stale.read_text(encoding="utf-8").startswith("# Trainers, edited by hand")  # --check writes nothing


def test_example_trainers_resolve_through_nnunets_lookup(render_docs, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from trainers import EXT_TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", EXT_TRAINER_DIR)
    for name in render_docs.EXAMPLE_TRAINERS:
        assert recursive_find_trainer_class_by_name(name).__name__ == name
