# Sourced by demo.sh and test.sh: creates or reuses .venv in the repository, installs the project into it and
# exports nnUNet_extTrainer so the stock nnUNetv2_* commands find the plugin's trainers.
#   TORCH_SPEC  torch requirement used only when no torch is importable (default: torch==2.13.0, the CPU build here)
#   PYTHON      interpreter that creates the venv (default: python3)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
fi

# Reinstall only when setup.py changed; pin the torch that is there so nnunetv2 cannot pull another one.
STAMP="$VENV/.nnunet_ssp_install_stamp"
WANT="$(sha256sum "$REPO_ROOT/setup.py" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing nnunet-ssp (editable) with test extras"
  CONSTRAINTS="$(mktemp)"
  python -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
  pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" -e "$REPO_ROOT[test]"
  rm -f "$CONSTRAINTS"
  nnunet_ssp install-hooks
  echo "$WANT" > "$STAMP"
fi

eval "$(nnunet_ssp env | grep '^export')"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
export nnUNet_compile="${nnUNet_compile:-false}"
