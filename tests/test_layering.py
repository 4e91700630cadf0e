"""The package layering of ``.importlinter`` holds (``lint-imports``), and its layers contract does catch imports."""

import configparser
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS_SECTION = "importlinter:contract:core-below-plugins"


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``.importlinter`` in ``folder``, with the repository's packages importable and no cache
    folder written."""
    executable = shutil.which("lint-imports")
    assert executable, "import-linter is not installed: pip install -e '.[test]'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([executable, "--no-cache"], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_every_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_contract_reversed_is_broken(tmp_path):
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    layers = config[LAYERS_SECTION]
    layers["layers"] = "\n".join(reversed(layers["layers"].strip().splitlines()))  # the core on top
    reversed_config = configparser.ConfigParser()
    reversed_config.read_dict({"importlinter": config["importlinter"], LAYERS_SECTION: layers})
    with open(tmp_path / ".importlinter", "w") as f:
        reversed_config.write(f)
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "Contracts: 0 kept, 1 broken." in result.stdout, result.stdout + result.stderr
    assert "trainers is not allowed to import nnunet_ssp" in result.stdout
