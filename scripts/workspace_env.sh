# Sourced by demo.sh: source workspace_env.sh "$FOLDER_OR_EMPTY" DEFAULT_NAME
# The venv (setup_env.sh), then nnU-Net's three folders under WORK (the given folder, else $REPO_ROOT/DEFAULT_NAME)
# unless they are set already, CPU-sized data loading (augmentation in the main process), cwd = the repository.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
WORK="$(realpath -m "${1:-$REPO_ROOT/$2}")"
cd "$REPO_ROOT"
export nnUNet_raw="${nnUNet_raw:-$WORK/nnUNet_raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-$WORK/nnUNet_preprocessed}"
export nnUNet_results="${nnUNet_results:-$WORK/nnUNet_results}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-0}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
