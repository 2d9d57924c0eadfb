"""Velocity networks: shapes, zero init, conditioning, gradients, memory formats, configs, counts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distillkac.errors import DistillKacError
from distillkac.nets import (
    MLP,
    REFERENCE_CONFIGS,
    MLPConfig,
    UNet,
    UNetConfig,
    build_network,
    config_parameter_count,
    count_parameters,
    network_config_from_dict,
)

TINY_CONFIGS = {
    "unet": UNetConfig(image_channels=2, resolution=8, model_channels=16, channel_mult=(1, 2),
                       num_res_blocks=1, attn_resolutions=(8, 4), dropout=0.1, num_classes=3, num_heads=2,
                       groups=8),
    "unet-uncond": UNetConfig(image_channels=1, resolution=8, model_channels=8, channel_mult=(1, 1, 2),
                              num_res_blocks=1, attn_resolutions=(2,), dropout=0.0, num_classes=0,
                              num_heads=1, groups=4),
    "mlp": MLPConfig(dim=3, hidden=32, depth=2, num_classes=4, dropout=0.1),
}

REFERENCE_PARAMETER_COUNTS = {
    "cifar10": 38_302_851,
    "celeba64": 38_297_731,
    "lsun-bedroom256": 118_775_555,
    "digits": 190_657,
    "toy2d": 1_188_354,
}
"""Computed once with config_parameter_count (this commit's design); a changed design must update them."""

SANITY_RANGES = {
    "cifar10": (33e6, 40e6),  # the DDPM / ADM CIFAR-10 UNet: 35.7M
    "celeba64": (33e6, 40e6),
    "lsun-bedroom256": (100e6, 130e6),  # DDPM's LSUN-256 UNet: 114M
    "digits": (0.1e6, 1e6),
    "toy2d": (0.5e6, 2e6),
}


pytestmark = pytest.mark.usefixtures("single_thread")


def make_inputs(model: UNet | MLP, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.data_shape, generator=generator)
    t = torch.rand(batch, generator=generator)
    y = torch.randint(0, model.null_label + 1, (batch,), generator=generator)
    return x, t, y


def build(kind: str, seed: int = 0) -> UNet | MLP:
    return build_network(TINY_CONFIGS[kind], generator=torch.Generator().manual_seed(seed))


def perturb_output_layer(model: UNet | MLP, seed: int = 1) -> None:
    layer = model.out_conv if isinstance(model, UNet) else model.output
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_output_shape_is_input_shape_and_exactly_zero_at_init(kind: str) -> None:
    model = build(kind)
    x, t, y = make_inputs(model, batch=5)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_output_depends_on_time_and_label(kind: str) -> None:
    model = build(kind).eval()
    perturb_output_layer(model)
    x, _, _ = make_inputs(model, batch=4)
    t = torch.full((4,), 0.3)
    y = torch.zeros(4, dtype=torch.long)
    base = model(x, t, y)
    assert base.abs().max() > 1e-3
    later = model(x, t + 0.2, y)
    other_class = model(x, t, y + 1)
    null = model(x, t, torch.full_like(y, model.null_label))
    for changed in (later, other_class, null):
        assert (changed - base).abs().max() > 1e-4


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_same_generator_seed_gives_same_weights_and_global_rng_untouched(kind: str) -> None:
    before = torch.random.get_rng_state()
    first, second, other = build(kind, seed=3), build(kind, seed=3), build(kind, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(first.parameters(), other.parameters()))


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_gradients_reach_every_parameter(kind: str) -> None:
    model = build(kind).train()
    perturb_output_layer(model)
    x, t, y = make_inputs(model, batch=8)
    y[0] = model.null_label  # the null row of the label table is used too
    model(x, t, y).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name


@pytest.mark.parametrize("kind", ["unet", "unet-uncond"])
def test_channels_last_matches_contiguous(kind: str) -> None:
    model = build(kind).eval()
    perturb_output_layer(model)
    x, t, y = make_inputs(model, batch=3)
    expected = model(x, t, y)
    model_cl = model.to(memory_format=torch.channels_last)
    got = model_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_rows_are_independent_in_eval_mode(kind: str) -> None:
    model = build(kind).eval()
    perturb_output_layer(model)
    x, t, y = make_inputs(model, batch=6)
    batch_out = model(x, t, y)
    for i in range(6):
        row = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(row[0], batch_out[i], rtol=0, atol=1e-5)


def test_bf16_autocast_on_cpu_returns_input_dtype_and_close_values() -> None:
    model = build("unet").eval()
    perturb_output_layer(model)
    x, t, y = make_inputs(model, batch=2)
    expected = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, t, y)
    assert got.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_json_round_trip_rebuilds_the_same_network(kind: str) -> None:
    config = TINY_CONFIGS[kind]
    restored = network_config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert type(restored) is type(config)
    assert count_parameters(build_network(restored, generator=torch.Generator().manual_seed(0))) == \
        count_parameters(build(kind))


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_config_json_round_trip(name: str) -> None:
    config = REFERENCE_CONFIGS[name]
    restored = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert config_parameter_count(restored) == config_parameter_count(config)


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_reference_parameter_counts(name: str) -> None:
    count = config_parameter_count(REFERENCE_CONFIGS[name])
    low, high = SANITY_RANGES[name]
    assert low <= count <= high
    assert count == REFERENCE_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", ["cifar10", "digits", "toy2d"])
def test_meta_count_equals_allocated_count(name: str) -> None:
    model = build_network(REFERENCE_CONFIGS[name], generator=torch.Generator().manual_seed(0))
    assert count_parameters(model) == REFERENCE_PARAMETER_COUNTS[name]


def test_unet_parameter_count_matches_a_hand_count() -> None:
    """A 1-level UNet counted layer by layer: C=8 channels, E=32 embedding, 1 image channel, 2 labels."""
    config = UNetConfig(image_channels=1, resolution=4, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                        attn_resolutions=(), num_classes=1, num_heads=1, groups=4, dropout=0.0)
    c, e, image = 8, 32, 1

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout

    def res(cin: int, cout: int) -> int:
        skip = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + (e * 2 * cout + 2 * cout) + conv(cout, cout, 3) + skip

    embedding = (c * e + e) + (e * e + e) + 2 * e
    attention = 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)
    expected = (embedding + conv(image, c, 3) + res(c, c)            # input conv, one down block
                + res(c, c) + attention + res(c, c)                    # middle
                + 2 * res(2 * c, c)                                    # two up blocks with skips
                + 2 * c + conv(c, image, 3))                           # output norm + conv
    assert count_parameters(build_network(config, generator=torch.Generator().manual_seed(0))) == expected


def test_attention_layers_sit_at_the_configured_resolutions() -> None:
    model = build("unet")  # resolution 8, mult (1, 2), attn at 8 and 4
    down_attention = [stage.attention is not None for stage in model.down if hasattr(stage, "attention")]
    up_attention = [stage.attention is not None for stage in model.up]
    assert down_attention == [True, True]
    assert up_attention == [True, True, True, True]
    no_attention = dataclasses.replace(TINY_CONFIGS["unet"], attn_resolutions=(4,))
    model = build_network(no_attention, generator=torch.Generator().manual_seed(0))
    down_attention = [stage.attention is not None for stage in model.down if hasattr(stage, "attention")]
    assert down_attention == [False, True]
    assert [stage.attention is not None for stage in model.up] == [True, True, False, False]


def test_attributes() -> None:
    unet, mlp = build("unet"), build("mlp")
    assert (unet.num_classes, unet.null_label, unet.data_shape) == (3, 3, (2, 8, 8))
    assert (mlp.num_classes, mlp.null_label, mlp.data_shape) == (4, 4, (3,))
    assert unet.config is TINY_CONFIGS["unet"]
    assert unet.embedding.label_table.num_embeddings == 4
    assert build("unet-uncond").embedding.label_table.num_embeddings == 1


@pytest.mark.parametrize(("overrides", "field"), [
    ({"resolution": 9}, "resolution"),
    ({"attn_resolutions": (16,)}, "attn_resolutions"),
    ({"model_channels": 0}, "model_channels"),
    ({"num_res_blocks": 0}, "num_res_blocks"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"groups": 5}, "groups"),
    ({"num_heads": 3}, "num_heads"),
    ({"num_classes": -1}, "num_classes"),
    ({"time_scale": 0.0}, "time_scale"),
    ({"channel_mult": ()}, "channel_mult"),
    ({"image_channels": 0}, "image_channels"),
    ({"kind": "mlp"}, "kind"),
])
def test_bad_unet_config_names_the_field(overrides: dict, field: str) -> None:
    config = dataclasses.replace(TINY_CONFIGS["unet"], **overrides)
    with pytest.raises(DistillKacError, match=rf"UNetConfig\.{field}:") as info:
        UNet(config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"dim": 0}, "dim"), ({"hidden": -2}, "hidden"), ({"depth": 0}, "depth"),
    ({"num_classes": -1}, "num_classes"), ({"time_scale": -1.0}, "time_scale"), ({"dropout": 1.5}, "dropout"),
])
def test_bad_mlp_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(DistillKacError, match=rf"MLPConfig\.{field}:"):
        MLP(dataclasses.replace(TINY_CONFIGS["mlp"], **overrides))


def test_config_dicts_are_checked() -> None:
    with pytest.raises(DistillKacError, match=r"net\.kind: .*\['mlp', 'unet'\]"):
        build_network({"kind": "transformer"})
    with pytest.raises(DistillKacError, match=r"UNetConfig: unknown field\(s\) \['width'\]"):
        network_config_from_dict({"kind": "unet", "width": 3})
    with pytest.raises(DistillKacError, match=r"UNetConfig\.groups:"):
        network_config_from_dict({"kind": "unet", "groups": 7})


@pytest.mark.parametrize(("kind", "change", "pattern"), [
    ("unet", lambda x, t, y: (x[:, :1], t, y), r"x: expected shape \[B, 2, 8, 8\]"),
    ("unet", lambda x, t, y: (x[..., :4, :4], t, y), r"x: expected shape \[B, 2, 8, 8\]"),
    ("unet", lambda x, t, y: (x[0], t, y), r"x: expected shape"),
    ("mlp", lambda x, t, y: (x[:, :2], t, y), r"x: expected shape \[B, 3\]"),
    ("unet", lambda x, t, y: (x, t[:2], y), r"t: expected a float tensor of shape \[4\]"),
    ("unet", lambda x, t, y: (x, t, y.float()), r"y: expected an integer"),
    ("unet", lambda x, t, y: (x, t, y + 4), r"y: labels must be in 0\.\.3"),
    ("mlp", lambda x, t, y: (x, t, y - 1), r"y: labels must be in 0\.\.4"),
])
def test_bad_inputs_raise_naming_the_argument(kind, change, pattern) -> None:
    model = build(kind)
    x, t, y = make_inputs(model, batch=4)
    y[:] = 0
    with pytest.raises(ValueError, match=pattern):
        model(*change(x, t, y))


def test_unconditional_model_accepts_only_the_null_label() -> None:
    model = build("unet-uncond")
    x, t, _ = make_inputs(model, batch=2)
    assert model(x, t, torch.zeros(2, dtype=torch.long)).shape == x.shape
    with pytest.raises(DistillKacError, match=r"y: labels must be in 0\.\.0"):
        model(x, t, torch.ones(2, dtype=torch.long))


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    model = build("unet").eval()
    perturb_output_layer(model)
    x, t, y = make_inputs(model, batch=2)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-5)
