"""A phantom dataset for the benchmarks, made by the stock CLIs (``nnunet_ssp phantom``, nnU-Net's planning)."""
import os
import subprocess
import sys


def use_workspace(root: str) -> None:
    """Points nnUNet_raw, nnUNet_preprocessed and nnUNet_results (of this process and its children) into ``root``."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[variable] = os.path.join(root, variable)
        os.makedirs(os.environ[variable], exist_ok=True)


def phantom_workspace(root: str, dataset_id: int, name: str, subjects: int, size: int) -> str:
    """In the workspace ``root``, makes the phantom dataset and plans and preprocesses it (2d) unless its plans
    exist; returns the dataset id."""
    use_workspace(root)
    bin_dir = os.path.dirname(sys.executable)
    subprocess.run([os.path.join(bin_dir, "nnunet_ssp"), "phantom", "-d", str(dataset_id), "-n", name, "--subjects",
                    str(subjects), "--test-subjects", "1", "--size", str(size)], check=True, stdout=subprocess.DEVNULL)
    plans = os.path.join(root, "nnUNet_preprocessed", f"Dataset{dataset_id}_{name}", "nnUNetPlans.json")
    if not os.path.isfile(plans):
        subprocess.run([os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d",
                        "-np", "2", "-npfp", "2"], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, nnUNet_n_proc_DA="2"))  # its planner calls set_num_threads(n_proc_DA)
    return str(dataset_id)
