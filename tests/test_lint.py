"""The repository's lint and format configuration (ruff.toml) holds for the whole tree."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["ruff", "check", "."], ["ruff", "format", "--check", "."]], ids=" ".join)
def test_ruff_is_clean(argv):
    assert shutil.which("ruff"), "ruff is not installed: pip install -e '.[test]'"
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
