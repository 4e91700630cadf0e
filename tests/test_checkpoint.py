"""The SSP checkpoint contract: contents, weights-only loading, verification against plans, refusals."""

import os
import pickle

import pytest
import torch
from conftest import DATASET_JSON, make_plans

from nnunet_ssp.checkpoint import FORMAT_NAME, FORMAT_VERSION, load_checkpoint, save_checkpoint, verify_checkpoint
from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration
from pretraining.methods import METHODS


def _mim_network(target):
    return target.network_spec.build(num_output_channels=1)  # MIM's reconstruction head has one channel


def test_roundtrip_holds_the_contract_fields_and_equal_tensors(tmp_path, target, seeded):
    net = _mim_network(target)
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(
        path, net, target, "mim", METHODS["mim"].parts, pretraining={"epochs": 3, "lr": 0.01}, data={"slices": 120}
    )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # loads without unpickling any code
    assert ckpt["format"] == FORMAT_NAME and ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["method"] == "mim" and ckpt["parts"] == ["encoder", "decoder"]
    assert ckpt["network"]["network_class_name"].endswith("PlainConvUNet")
    assert ckpt["network"]["num_input_channels"] == 1
    assert ckpt["network"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64]
    assert ckpt["plans"] == {
        "dataset_name": "Dataset990_Unit",
        "plans_name": "nnUNetPlans",
        "configuration": "2d",
        "data_identifier": "nnUNetPlans_2d",
        "patch_size": [64, 64],
        "spacing": [1.5, 1.5],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "transpose_forward": [0, 1, 2],
    }
    assert ckpt["pretraining"] == {"epochs": 3, "lr": 0.01} and ckpt["data"] == {"slices": 120}
    assert ckpt["versions"]["torch"] and ckpt["versions"]["nnunetv2"].startswith("2.8")
    state = net.state_dict()
    expected_keys = {
        k
        for k in state
        if k.startswith("encoder.")
        or (k.startswith("decoder.") and not k.startswith(("decoder.encoder.", "decoder.seg_layers.")))
    }
    assert set(ckpt["network_weights"]) == expected_keys
    for k in expected_keys:
        assert torch.equal(ckpt["network_weights"][k], state[k])
    assert load_checkpoint(path)["method"] == "mim"
    assert [f for f in os.listdir(tmp_path)] == ["ckpt.pth"]  # atomic write leaves no temp file


def test_encoder_methods_store_the_encoder_only(tmp_path, target, seeded):
    path = str(tmp_path / "dino.pth")
    save_checkpoint(path, target.network_spec.build(4), target, "dino", METHODS["dino"].parts)
    ckpt = load_checkpoint(path)
    assert ckpt["parts"] == ["encoder"]
    assert ckpt["network_weights"] and all(k.startswith("encoder.") for k in ckpt["network_weights"])


@pytest.mark.parametrize(
    "method, parts",
    [
        ("mim", ("encoder", "head")),
        ("mim", ()),
        ("mim", ("encoder", "encoder")),
        ("", ("encoder",)),
        (None, ("encoder",)),
    ],
)
def test_invalid_method_or_parts_are_refused(tmp_path, target, method, parts):
    with pytest.raises(SSPError, match="invalid method .* or parts"):
        save_checkpoint(str(tmp_path / "x.pth"), target.network_spec.build(4), target, method, parts)
    assert not os.listdir(tmp_path)


def test_saving_a_network_that_does_not_match_the_plans_fails_and_writes_nothing(tmp_path, target):
    other = PlannedConfiguration(make_plans(features=(8, 16, 32)), "2d", DATASET_JSON)
    with pytest.raises(SSPError, match="do not fit"):
        save_checkpoint(str(tmp_path / "x.pth"), other.network_spec.build(4), target, "mim", METHODS["mim"].parts)
    assert not os.listdir(tmp_path)


def test_verify_accepts_matching_plans_and_warns_about_spacing(tmp_path, target):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, _mim_network(target), target, "mim", METHODS["mim"].parts)
    assert verify_checkpoint(load_checkpoint(path), target, ["encoder", "decoder"], path) == []
    plans = make_plans()
    plans["configurations"]["2d"]["spacing"] = [1.25, 1.25]
    warnings = verify_checkpoint(
        load_checkpoint(path), PlannedConfiguration(plans, "2d", DATASET_JSON), ["encoder"], path
    )
    assert len(warnings) == 1 and "spacing [1.5, 1.5]" in warnings[0] and "[1.25, 1.25]" in warnings[0]


@pytest.mark.parametrize(
    "plans, expected",
    [
        (make_plans(features=(8, 16, 32, 48)), "features_per_stage [8, 16, 32, 64] vs [8, 16, 32, 48]"),
        (make_plans(features=(8, 16, 32, 64, 128)), "n_stages 4 vs 5"),
        (make_plans(network="ResidualEncoderUNet"), "network_class_name"),
    ],
)
def test_checkpoint_for_other_plans_is_refused_with_the_differences(tmp_path, target, plans, expected):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, _mim_network(target), target, "mim", METHODS["mim"].parts)
    with pytest.raises(SSPError) as e:
        verify_checkpoint(load_checkpoint(path), PlannedConfiguration(plans, "2d", DATASET_JSON), ["encoder"], path)
    assert path in str(e.value) and expected in str(e.value) and "other plans" in str(e.value)


def test_other_input_channel_count_is_refused(tmp_path, target):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, _mim_network(target), target, "mim", METHODS["mim"].parts)
    two_channels = dict(DATASET_JSON, channel_names={"0": "cine", "1": "t1"})
    with pytest.raises(SSPError, match="num_input_channels 1 vs 2"):
        verify_checkpoint(
            load_checkpoint(path), PlannedConfiguration(make_plans(), "2d", two_channels), ["encoder"], path
        )


def test_missing_part_is_refused(tmp_path, target):
    path = str(tmp_path / "simclr.pth")
    save_checkpoint(path, target.network_spec.build(4), target, "simclr", METHODS["simclr"].parts)
    with pytest.raises(SSPError, match="holds encoder but decoder is needed"):
        verify_checkpoint(load_checkpoint(path), target, ["encoder", "decoder"], path)


def test_files_that_are_not_contract_checkpoints_are_refused(tmp_path, target):
    nnunet_style = tmp_path / "nnunet.pth"
    torch.save({"network_weights": target.network_spec.build(4).state_dict()}, nnunet_style)
    with pytest.raises(SSPError, match="not an nnunet_ssp checkpoint"):
        load_checkpoint(str(nnunet_style))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(SSPError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(str(text))
    with pytest.raises(SSPError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "absent.pth"))


def test_contract_checkpoints_with_malformed_contents_are_refused(tmp_path, target):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, _mim_network(target), target, "mim", METHODS["mim"].parts)
    checkpoint = load_checkpoint(path)
    torch.save({**checkpoint, "network_weights": {"encoder.x": [1.0]}}, path)
    with pytest.raises(SSPError, match="network_weights is not a dict of named tensors"):
        load_checkpoint(path)
    torch.save({**checkpoint, "network": {"num_input_channels": 1}}, path)
    with pytest.raises(SSPError, match="network record is malformed"):
        verify_checkpoint(load_checkpoint(path), target, ["encoder"], path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"format": FORMAT_NAME, "payload": _Payload(str(marker))}, path)
    with open(path, "rb") as f:  # sanity: the payload does run under an unsafe load
        assert b"open" in f.read()
    with pytest.raises(SSPError, match="refused to load: unpickling it would call .*open, which a weights-only"):
        load_checkpoint(str(path))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    torch.load(path, weights_only=False)  # proves the marker test could fail
    assert marker.exists()
