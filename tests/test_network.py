"""Network parts: which state-dict keys are the encoder and decoder, and in-place loading."""

import pytest
import torch
from conftest import DATASET_JSON, make_plans

from nnunet_ssp.errors import SSPError
from nnunet_ssp.network import PlannedConfiguration, extract_parts, load_parts, part_of_key


@pytest.mark.parametrize(
    "key, part",
    [
        ("encoder.stages.0.0.convs.0.conv.weight", "encoder"),
        ("encoder.stem.convs.0.conv.weight", "encoder"),
        ("decoder.stages.1.convs.0.norm.bias", "decoder"),
        ("decoder.transpconvs.0.weight", "decoder"),
        ("decoder.encoder.stages.0.0.convs.0.conv.weight", None),
        ("decoder.seg_layers.2.weight", None),
    ],
)
def test_part_of_key(key, part):
    assert part_of_key(key) == part


@pytest.mark.parametrize("network", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_parts_cover_every_unique_tensor_but_the_heads(network, seeded):
    net = PlannedConfiguration(make_plans(network=network), "2d", DATASET_JSON).network_spec.build(4)
    encoder = extract_parts(net, ["encoder"])
    both = extract_parts(net, ["encoder", "decoder"])
    assert set(encoder) == {k for k in net.state_dict() if k.startswith("encoder.")}
    assert set(encoder) == {"encoder." + k for k in net.encoder.state_dict()}
    decoder_keys = set(both) - set(encoder)
    assert decoder_keys and all(k.startswith("decoder.") for k in decoder_keys)
    assert not any("seg_layers" in k or k.startswith("decoder.encoder.") for k in both)
    # everything left out is a head or an alias of an encoder tensor
    left_out = set(net.state_dict()) - set(both)
    assert left_out == {k for k in net.state_dict() if k.startswith(("decoder.seg_layers.", "decoder.encoder."))}


def test_load_parts_copies_in_place_and_keeps_aliases_in_sync(target, seeded):
    source = target.network_spec.build(4)
    dest = target.network_spec.build(4)
    param_ids = [id(p) for p in dest.parameters()]
    report = load_parts(dest, extract_parts(source, ["encoder"]), ["encoder"], source="unit")
    assert [id(p) for p in dest.parameters()] == param_ids  # same Parameter objects: optimizers stay valid
    for k, v in source.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(dest.state_dict()[k], v)
            assert torch.equal(dest.state_dict()["decoder." + k], v)  # the decoder's encoder alias
    assert not torch.equal(dest.decoder.transpconvs[0].weight, source.decoder.transpconvs[0].weight)
    assert report.tensors_per_part["encoder"] == len(extract_parts(source, ["encoder"]))
    assert report.parameters_per_part["encoder"] == sum(v.numel() for v in extract_parts(source, ["encoder"]).values())


def test_load_parts_refuses_wrong_shapes_and_names_them(target, seeded):
    other = PlannedConfiguration(make_plans(features=(8, 16, 32, 48)), "2d", DATASET_JSON).network_spec.build(4)
    dest = target.network_spec.build(4)
    before = {k: v.clone() for k, v in dest.state_dict().items()}
    with pytest.raises(SSPError) as e:
        load_parts(dest, extract_parts(other, ["encoder"]), ["encoder"], source="ckpt.pth")
    message = str(e.value)
    assert "ckpt.pth" in message and "encoder.stages.3" in message and "[48" in message and "[64" in message
    assert "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in dest.state_dict().items())  # nothing half-loaded
