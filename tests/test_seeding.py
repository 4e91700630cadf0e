"""Seeded fine-tuning (trainers/seeding.py) and seeded pretraining, through the real command lines.

The ``nnUNetv2_train`` runs (2 epochs x 3 iterations on a private copy of the phantom workspace, with a 4x narrower
network; each run in its own nnUNet_results) go two at a time and are shared by the tests: seed 0 with 0 and with 2
data-loading workers, seed 0 stopped after epoch 0's checkpoint_latest.pth and continued with ``--c``, seed 1, and
the unseeded trainer twice. A run's digest is the sha256 of its final network tensors and SGD momentum buffers."""

import hashlib
import json
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from conftest import PHANTOM_DATASET, PHANTOM_ID, run_cli

from nnunet_ssp import workspace
from nnunet_ssp.checkpoint import save_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.io import FAULT_ENV
from nnunet_ssp.network import PlannedConfiguration
from nnunet_ssp.runner import PARALLEL_RUN_ENV
from pretraining.methods import METHODS
from trainers import EXT_TRAINER_DIR, ssp_trainers
from trainers.seeding import RECORD_FILE, SCHEME, check_resumable

CPU = torch.device("cpu")
PLANS = "nnUNetPlansNarrow"
BASELINE = "nnUNetTrainerBaseline"


def _in_pairs(jobs: dict) -> dict:
    """Runs the callables of ``jobs`` two at a time (their processes wait for a core passively: PARALLEL_RUN_ENV)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def seeding_workspace(phantom_workspace, tmp_path_factory):
    """A private copy of the phantom workspace: the plans ``PLANS`` (4x fewer features) and a one-fold split with one
    validation case (nnU-Net's final validation costs the most), written before any run."""
    source, _ = phantom_workspace
    root = tmp_path_factory.mktemp("seeding")
    env = workspace.workspace_env(
        str(root),
        nnUNet_def_n_proc="1",
        nnUNet_ssp_num_epochs="2",
        nnUNet_ssp_iters_per_epoch="3",
        nnUNet_ssp_save_every="1",
        **PARALLEL_RUN_ENV,
    )
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(os.path.join(source, name), env[name], dirs_exist_ok=True)
    folder = os.path.join(env["nnUNet_preprocessed"], PHANTOM_DATASET)
    plans = load_json(os.path.join(folder, "nnUNetPlans.json"))
    arch_kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch_kwargs["features_per_stage"] = [f // 4 for f in arch_kwargs["features_per_stage"]]
    save_json(dict(plans, plans_name=PLANS), os.path.join(folder, f"{PLANS}.json"), sort_keys=False)
    cases = sorted(
        f[: -len(".b2nd")]
        for f in os.listdir(os.path.join(folder, "nnUNetPlans_2d"))
        if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")
    )
    save_json([{"train": cases[:-1], "val": cases[-1:]}], os.path.join(folder, "splits_final.json"))
    return root, env


def _train(env, trainer, *extra, check=True, **settings):
    return run_cli(
        ["nnUNetv2_train", str(PHANTOM_ID), "2d", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", *extra],
        dict(env, **settings),
        check=check,
    )


def _fold(env, trainer, fold=0):
    return os.path.join(env["nnUNet_results"], PHANTOM_DATASET, f"{trainer}__{PLANS}__2d", f"fold_{fold}")


@pytest.fixture(scope="module")
def runs(seeding_workspace):
    """name -> the fold folder of that run."""
    root, env = seeding_workspace
    skip_validation = {"nnUNet_ssp_skip_final_validation": "1"}

    def own_env(name, workers):
        return dict(env, nnUNet_results=str(root / f"results_{name}"), nnUNet_n_proc_DA=str(workers))

    def run(name, trainer, workers, **settings):
        def job():
            _train(own_env(name, workers), trainer, **settings)
            return _fold(own_env(name, workers), trainer)

        return job

    def stopped_then_continued():
        own = own_env("resumed", 2)
        stopped = _train(own, f"{BASELINE}_seed0", check=False, **{FAULT_ENV: "epoch_end:0=EIO"})
        folder = _fold(own, f"{BASELINE}_seed0")
        assert stopped.returncode != 0 and "OSError: [Errno 5]" in stopped.stderr
        assert os.path.isfile(os.path.join(folder, "checkpoint_latest.pth"))
        assert not os.path.exists(os.path.join(folder, "checkpoint_final.pth"))
        _train(own, f"{BASELINE}_seed0", "--c")
        return folder

    return _in_pairs(
        {
            "resumed": stopped_then_continued,
            "workers0": run("workers0", f"{BASELINE}_seed0", 0),
            "workers2": run("workers2", f"{BASELINE}_seed0", 2),
            "seed1": run("seed1", f"{BASELINE}_seed1", 2, **skip_validation),
            "unseeded_a": run("unseeded_a", BASELINE, 2, **skip_validation),
            "unseeded_b": run("unseeded_b", BASELINE, 2, **skip_validation),
        }
    )


def _digest(folder: str) -> str:
    checkpoint = torch.load(
        os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False
    )  # nnU-Net's own checkpoint holds numpy scalars
    digest = hashlib.sha256()
    tensors = [v for _, v in sorted(checkpoint["network_weights"].items())]
    tensors += [s["momentum_buffer"] for _, s in sorted(checkpoint["optimizer_state"]["state"].items())]
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _summary(folder: str) -> str:
    """nnU-Net's validation summary.json, without the file paths (each run has its own results folder)."""
    summary = load_json(os.path.join(folder, "validation", "summary.json"))
    for case in summary["metric_per_case"]:
        del case["prediction_file"], case["reference_file"]
    return json.dumps(summary, sort_keys=True)  # as text: NaN (a label absent in both) equals itself


def test_one_seed_repeats_bit_for_bit_with_0_or_2_workers_and_after_a_stop_and_c(runs):
    """Seed 0 with 0 workers, with 2, and stopped after epoch 0 then continued with --c: the same network, momentum
    and validation results; the record says what ran."""
    folders = [runs["workers0"], runs["workers2"], runs["resumed"]]
    digests = [_digest(f) for f in folders]
    print("seed 0 digests (0 workers, 2 workers, stopped + --c):", digests)
    assert len(set(digests)) == 1
    assert len({_summary(f) for f in folders}) == 1
    records = [load_json(os.path.join(f, RECORD_FILE)) for f in folders]
    assert all((r["trainer"], r["seed"], r["scheme"]) == (f"{BASELINE}_seed0", 0, SCHEME) for r in records)
    assert [[(s["epoch"], s["nnUNet_n_proc_DA"]) for s in r["starts"]] for r in records] == [
        [(0, 0)],
        [(0, 2)],
        [(0, 2), (1, 2)],
    ]
    assert records[0]["starts"][0]["world_size"] == 1 and records[0]["starts"][0]["device"] == "cpu"
    assert set(records[0]["starts"][0]["versions"]) == {
        "torch",
        "numpy",
        "nnunetv2",
        "batchgenerators",
        "batchgeneratorsv2",
    }


def test_another_seed_differs_and_the_unseeded_trainer_differs_from_itself(runs):
    digests = {name: _digest(runs[name]) for name in ("workers0", "seed1", "unseeded_a", "unseeded_b")}
    print("digests:", digests)
    assert digests["seed1"] != digests["workers0"] and digests["unseeded_a"] != digests["unseeded_b"]
    assert load_json(os.path.join(runs["seed1"], RECORD_FILE))["seed"] == 1
    assert not os.path.exists(os.path.join(runs["unseeded_a"], RECORD_FILE))


def test_c_under_another_seed_is_refused_in_one_line_and_writes_nothing(runs, seeding_workspace, tmp_path):
    """A seed-0 fold copied into the seed-1 trainer's folder: nnUNetv2_train --c with seed 1 stops before writing."""
    _, env = seeding_workspace
    env = dict(env, nnUNet_results=str(tmp_path))
    folder = _fold(env, f"{BASELINE}_seed1")
    shutil.copytree(runs["workers0"], folder)
    before = sorted(os.listdir(folder))
    refused = _train(env, f"{BASELINE}_seed1", "--c", check=False)
    record = os.path.join(folder, RECORD_FILE)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1] == (
        f"nnunet_ssp error: {record}: this fold was trained with seed 0 ({SCHEME}), but {BASELINE}_seed1 trains with "
        f"seed 1 ({SCHEME}); continue it with {BASELINE}_seed0 or train afresh without --c"
    )
    assert sorted(os.listdir(folder)) == before


def test_c_refusals_of_mixed_streams(tmp_path):
    """Seeded and unseeded do not continue each other's folds, nor do two schemes; a fold without checkpoints (a
    --c that starts afresh) and one of the same seed and scheme continue."""
    folder = str(tmp_path)
    check_resumable(folder, f"{BASELINE}_seed0", 0)
    (tmp_path / "checkpoint_latest.pth").touch()
    check_resumable(folder, BASELINE, None)
    with pytest.raises(
        SSPError, match=f"trained unseeded .*{BASELINE}_seed0 trains with seed 0 .*continue it with {BASELINE} or"
    ):
        check_resumable(folder, f"{BASELINE}_seed0", 0)
    record = {"trainer": f"{BASELINE}_seed0", "seed": 0, "scheme": SCHEME}
    (tmp_path / RECORD_FILE).write_text(json.dumps(record))
    check_resumable(folder, f"{BASELINE}_seed0", 0)
    with pytest.raises(
        SSPError, match=f"trained with seed 0 .* but {BASELINE} trains unseeded; continue it with {BASELINE}_seed0"
    ):
        check_resumable(folder, BASELINE, None)
    (tmp_path / RECORD_FILE).write_text(json.dumps(dict(record, scheme="another scheme")))
    with pytest.raises(SSPError, match=r"seed 0 \(another scheme\)"):
        check_resumable(folder, f"{BASELINE}_seed0", 0)


def test_seeded_trainers_are_made_on_demand_for_every_trainer_and_found_by_nnunet(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    name = "nnUNetTrainerMIM_baselineLR_encoderOnly_paperSchedule_seed3"
    monkeypatch.setenv("nnUNet_extTrainer", EXT_TRAINER_DIR)
    cls = recursive_find_trainer_class_by_name(name)  # through the shim's hasattr, as nnUNetv2_train
    assert cls is getattr(ssp_trainers, name) and cls.__module__ == "trainers.ssp_trainers"
    assert cls.__mro__[1:3] == (
        ssp_trainers.SeededTrainingMixin,
        ssp_trainers.nnUNetTrainerMIM_baselineLR_encoderOnly_paperSchedule,
    )
    assert cls.training_seed == 3 and all(t.training_seed is None for t in ssp_trainers.ALL_TRAINERS)
    pickled = pickle.dumps(cls)
    assert pickle.loads(pickled) is cls
    monkeypatch.delitem(vars(ssp_trainers), name)  # a fresh process (spawn, DDP) makes it on unpickling
    remade = pickle.loads(pickled)
    assert remade is not cls and remade.__name__ == name and remade.training_seed == 3
    assert ssp_trainers.nnUNetTrainerBaseline_seed12345678901.training_seed == 12345678901
    for bad in (
        "nnUNetTrainer_seed0",
        f"{BASELINE}_seed01",
        f"{BASELINE}_seed-1",
        f"{BASELINE}_seed",
        f"{BASELINE}_seed0_seed1",
        f"{BASELINE}_baselineLR_seed0",
        f"{BASELINE}_seed0_paperSchedule",
        "seeded_trainer_seed0",
    ):
        assert not hasattr(ssp_trainers, bad), bad
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name(f"{BASELINE}_seed0_seed1")


def test_the_parts_an_ssp_trainer_does_not_load_start_as_the_baselines_of_its_seed(
    seeding_workspace, monkeypatch, tmp_path
):
    """MIM's seeded trainer loads encoder and decoder; its segmentation heads then equal those of the baseline of
    the same seed, and every tensor of the two differs from another seed's."""
    _, env = seeding_workspace
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    target = PlannedConfiguration.from_preprocessed(str(PHANTOM_ID), PLANS)
    checkpoint = str(tmp_path / "mim.pth")
    save_checkpoint(checkpoint, target.network_spec.build(1), target, "mim", METHODS["mim"].parts)
    monkeypatch.setenv("nnUNet_ssp_checkpoint", checkpoint)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], PHANTOM_DATASET)

    def initialized(name):
        plans = dict(load_json(os.path.join(preprocessed, f"{PLANS}.json")), continue_training=False)
        trainer = getattr(ssp_trainers, name)(
            plans, "2d", 0, load_json(os.path.join(preprocessed, "dataset.json")), CPU
        )
        trainer.initialize()
        return trainer

    mim, baseline, other = (
        initialized(n) for n in ("nnUNetTrainerMIM_seed0", f"{BASELINE}_seed0", f"{BASELINE}_seed1")
    )
    assert all(torch.equal(v, baseline.network.state_dict()[k]) for k, v in mim.network.state_dict().items())
    mim._load_ssp_weights()
    heads = [k for k in baseline.network.state_dict() if k.startswith("decoder.seg_layers.")]
    state, reference, another = (t.network.state_dict() for t in (mim, baseline, other))
    assert heads and all(torch.equal(state[k], reference[k]) for k in heads)
    assert not torch.equal(
        state["decoder.stages.0.convs.0.conv.weight"], reference["decoder.stages.0.convs.0.conv.weight"]
    )  # loaded from the checkpoint
    assert not any(torch.equal(v, another[k]) for k, v in reference.items() if k.endswith(".weight") and v.dim() > 1)


def test_ssp_pretrain_with_a_seed_repeats_bit_for_bit_with_workers_and_the_probes(seeding_workspace):
    """ssp_pretrain --seed 4 twice, 2 loader workers, the k-NN and segmentation probes on (their defaults), 2 epochs:
    the same weights, and the seed in the checkpoint."""
    root, env = seeding_workspace
    command = [
        "ssp_pretrain",
        "-d",
        str(PHANTOM_ID),
        "--method",
        "mim",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "2",
        "--device",
        "cpu",
        "--seed",
        "4",
        "-o",
    ]
    outputs = _in_pairs(
        {
            name: lambda name=name: run_cli(command + [str(root / name)], env) and str(root / name)
            for name in ("pretrain_a", "pretrain_b")
        }
    )
    checkpoints = [torch.load(os.path.join(o, "checkpoint_final.pth"), weights_only=True) for o in outputs.values()]
    log = open(os.path.join(outputs["pretrain_a"], "training_log.txt")).read()
    assert "segmentation probe:" in log and "probe_seg_dice" in log and "probe_position_mae" in log
    assert all(c["pretraining"]["seed"] == 4 and c["pretraining"]["num_workers"] == 2 for c in checkpoints)
    first, second = (c["network_weights"] for c in checkpoints)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
