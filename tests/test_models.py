"""Encoder, fusion and segmentor on real tiny smp/timm models (random init, no download)."""

from __future__ import annotations

import re

import pytest
import torch

from sgma.modalities import Modality, all_patterns, pattern_mask
from sgma.models import FUSIONS, build_fusion
from sgma.models.encoder import build_encoder, packing_index, validate_backbone_name
from sgma.models.fusion import ConcatFusion, MeanFusion
from sgma.models.segmentor import MultiModalSegmentor

MODS = (
    Modality("rgb", 3, (0.0,) * 3, (1.0,) * 3),
    Modality("nir", 1, (0.0,), (1.0,)),
    Modality("dsm", 1, (0.0,), (1.0,)),
)
MASKS = torch.tensor([pattern_mask(p, MODS) for p in all_patterns(MODS)])  # (7, 3)


def inputs(b: int, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(b, m.channels, size, size, generator=g) for m in MODS}


def with_garbage(x: dict[str, torch.Tensor], available: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fill every missing modality slot with huge values and NaN."""
    out = {}
    for i, m in enumerate(MODS):
        t = x[m.name].clone()
        t[~available[:, i]] = float("nan")
        t[~available[:, i], :, :2] = 1e6
        out[m.name] = t
    return out


@pytest.mark.parametrize("cls", [MeanFusion, ConcatFusion])
@pytest.mark.parametrize("training", [True, False])
def test_fusion_ignores_missing_modalities(cls, training):
    torch.manual_seed(0)
    fusion = cls(in_channels=8, num_modalities=3, num_classes=6).train(training)
    feats = torch.randn(7, 3, 8, 5, 5)
    ref = fusion(feats, MASKS).fused
    garbage = feats.clone()
    garbage[~MASKS] = float("nan")
    out = fusion(garbage, MASKS).fused
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_mean_fusion_is_the_average_of_available():
    feats = torch.randn(7, 3, 4, 2, 2)
    out = MeanFusion(in_channels=4, num_modalities=3, num_classes=2)(feats, MASKS).fused
    for i, mask in enumerate(MASKS):
        torch.testing.assert_close(out[i], feats[i, mask].mean(dim=0))


def test_fusion_rejects_empty_pattern():
    # checked on the device (torch._assert_async): a RuntimeError on CPU, no host sync on a GPU
    with pytest.raises(RuntimeError, match="at least one available"):
        MeanFusion(in_channels=4, num_modalities=3, num_classes=2)(torch.zeros(1, 3, 4, 2, 2), torch.zeros(1, 3).bool())


@pytest.mark.parametrize("shared", [True, False])
def test_segmentor_rejects_empty_pattern_on_the_host(shared):
    net = MultiModalSegmentor(
        modalities=MODS, num_classes=6, backbone="mit_b0", decoder_channels=32, shared_encoder=shared
    )
    available = MASKS[:2].clone()
    available[1] = False
    with pytest.raises(ValueError, match=r"at least one available modality; samples \[1\] have none"):
        net(inputs(2), available)
    with pytest.raises(ValueError, match="at least one available"):
        packing_index(available)


def test_packing_index_given_or_computed_gives_the_same_model_output():
    """The host-side plan (what the training module passes) and the device-side fallback agree."""
    torch.manual_seed(0)
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", fusion="sgf", decoder_channels=32)
    net.eval()
    x = inputs(7)
    index = packing_index(MASKS)
    slots = [b * 3 + m for b in range(7) for m in range(3) if MASKS[b, m]]
    assert index.tolist() == [slots, slots]  # encode these rows, put them back in the same places
    with torch.no_grad():
        torch.testing.assert_close(net(x, MASKS, encode_index=index).logits, net(x, MASKS).logits)


def test_packing_index_padded_to_a_multiple():
    """Padding (for compiled models: few packed shapes) re-encodes available slots only and sends them to the
    scratch row B * M; the model output does not change."""
    torch.manual_seed(0)
    index = packing_index(MASKS, multiple=7)
    slots = [b * 3 + m for b in range(7) for m in range(3) if MASKS[b, m]]
    n = len(slots)
    assert index.shape[1] % 7 == 0 and index.shape[1] >= n > index.shape[1] - 7
    assert index[0, :n].tolist() == slots and set(index[0, n:].tolist()) <= set(slots)
    assert index[1, :n].tolist() == slots and set(index[1, n:].tolist()) == {7 * 3}
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", fusion="sgf", decoder_channels=32)
    net.eval()
    x = inputs(7)
    with torch.no_grad():
        torch.testing.assert_close(net(x, MASKS, encode_index=index).logits, net(x, MASKS).logits)


def test_pack_multiple_bounds_the_encoder_shapes_in_eager_mode():
    """model.pack_multiple=N pads the packed batch of an eager model, in training and evaluation: at most B*M/N
    encoder shapes, the same outputs as without padding; bad values are refused with the fix."""
    torch.manual_seed(0)
    options = {"modalities": MODS, "num_classes": 6, "backbone": "mit_b0", "fusion": "sgf", "decoder_channels": 32}
    plain = MultiModalSegmentor(**options).eval()
    padded = MultiModalSegmentor(**options, pack_multiple=4).eval()
    padded.load_state_dict(plain.state_dict())
    sizes = set()
    for seed, rows in enumerate(([0, 1, 2, 3], [6, 6, 6, 5], [6, 3, 1, 0], [3, 4, 5, 6])):
        available = MASKS[rows]
        assert plain.plan_encoding(available).shape[1] == int(available.sum())
        sizes.add(padded.plan_encoding(available).shape[1])
        x = inputs(4, seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(padded(x, available).logits, plain(x, available).logits)
    assert sizes == {8, 12}  # 5, 11, 7 and 9 available slots
    assert padded.train().plan_encoding(MASKS[[0, 1, 2, 3]]).shape[1] == 8  # training pads the same way
    for bad in (0, -8, True, 2.5, "8"):
        with pytest.raises(ValueError, match=r"model\.pack_multiple must be null or a positive integer, got .*e\.g\."):
            MultiModalSegmentor(**options, pack_multiple=bad)


def test_unknown_fusion():
    with pytest.raises(ValueError, match=r"unknown fusion 'sum'.*mean, concat, sgf"):
        build_fusion("sum", in_channels=[4], num_modalities=2, num_classes=2)


SGF_OPTIONS = {"embed_dim": None, "num_heads": 2, "class_average": "weighted"}


def test_fusion_options_reach_only_their_fusion():
    """SGF presets keep their options when model.fusion=concat is chosen (they used to leak: TypeError)."""
    sizes = {"in_channels": [8, 16], "num_modalities": 3, "num_classes": 6}
    concat = build_fusion("concat", **sizes, sgf=SGF_OPTIONS, concat={}, mean={})
    assert [type(f) for f in concat] == [ConcatFusion, ConcatFusion]
    sgf = build_fusion("sgf", **sizes, sgf=SGF_OPTIONS, concat={}, mean={})
    assert [(f.num_heads, f.class_average) for f in sgf] == [(2, "weighted")] * 2
    net = MultiModalSegmentor(
        modalities=MODS, num_classes=6, backbone="mit_b0", fusion="concat", fusion_options={"sgf": SGF_OPTIONS}
    )
    assert all(isinstance(f, ConcatFusion) for f in net.fusion)


def test_fusion_option_errors_name_the_key():
    sizes = {"in_channels": [8], "num_modalities": 3, "num_classes": 6}
    with pytest.raises(ValueError, match=r"model\.fusion_options\.concat\.embed_dim: .*'concat' has no such option"):
        build_fusion("concat", **sizes, concat={"embed_dim": 8})
    with pytest.raises(ValueError, match=r"model\.fusion_options\.sgf\.heads: .*options: embed_dim, num_heads"):
        build_fusion("mean", **sizes, sgf={"heads": 2})  # checked even when sgf is not the active fusion
    with pytest.raises(ValueError, match=r"model\.fusion_options\.sgff: not a fusion"):
        build_fusion("sgf", **sizes, sgff={"num_heads": 2})
    with pytest.raises(ValueError, match=r"model\.fusion_options\.sgf=3: expected a mapping"):
        build_fusion("sgf", **sizes, sgf=3)


@pytest.mark.parametrize(
    "options, message",
    [  # bool("no") is True: these kept the encoder shared, turned channels-last on, or meant random init
        ({"shared_encoder": "no"}, "model.shared_encoder='no' must be true or false"),
        ({"channels_last": "no"}, "model.channels_last='no' must be true or false"),
        ({"channels_last": 1}, "model.channels_last=1 must be true or false"),
        ({"compile": 1}, "model.compile must be false, true or train, got 1"),
        ({"pretrained": 0}, "backbone.pretrained=0 must be true, false or the path of a weights file"),
        ({"dropout": "0.1"}, "model.dropout='0.1' must be in [0, 1)"),
        ({"decoder_channels": 0}, "model.decoder_channels=0 must be a whole number >= 1"),  # used to build
        ({"decoder_channels": -1}, "model.decoder_channels=-1 must be a whole number >= 1"),  # "negative dimension"
    ],
)
def test_segmentor_options_refuse_other_values_naming_the_key(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", **{"decoder_channels": 32, **options})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"embed_dim": 0}, "sgf.embed_dim=0 must be a whole number >= 1"),  # used to be a ZeroDivisionError
        ({"embed_dim": -4}, "sgf.embed_dim=-4 must be a whole number >= 1"),  # "negative dimension"
        ({"embed_dim": 2.5}, "sgf.embed_dim=2.5 must be a whole number >= 1"),
        ({"num_heads": 0}, "sgf.num_heads=0 must be a whole number >= 1 (embed_dim=32 must be divisible by"),
        ({"num_heads": "2"}, "sgf.num_heads='2' must be a whole number >= 1"),  # a TypeError of '<'
        ({"kernel_sizes": []}, "sgf.kernel_sizes=[] must be a list of odd whole numbers >= 1"),  # failed in forward
        ({"kernel_sizes": [4]}, "sgf.kernel_sizes=[4] must be a list of odd whole numbers >= 1"),
        ({"norm_groups": 0}, "sgf.norm_groups=0 must be a whole number >= 1"),  # read as gcd(0, C) = C groups
    ],
)
def test_sgf_sizes_refuse_non_positive_values_naming_the_key(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_fusion("sgf", in_channels=[32], num_modalities=3, num_classes=6, sgf=options)


def test_flat_fusion_options_of_old_checkpoints(caplog):
    """Configs stored before options were keyed by fusion hold the active fusion's options flat."""
    sizes = {"in_channels": [8], "num_modalities": 3, "num_classes": 6}
    with caplog.at_level("WARNING"):
        (sgf,) = build_fusion("sgf", **sizes, num_heads=2, embed_dim=None, class_average="uniform")
    assert sgf.num_heads == 2 and "old flat layout" in caplog.text
    with pytest.raises(ValueError, match=r"model\.fusion_options\.concat\.num_heads"):
        build_fusion("concat", **sizes, num_heads=2)


@pytest.mark.parametrize("backbone", ["mit_b0", "tu-pvt_v2_b0", "resnet18"])
@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_segmentor_every_family_and_fusion(backbone, fusion):
    torch.manual_seed(0)
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone=backbone, fusion=fusion, decoder_channels=32)
    x = inputs(7)
    out = net(x, MASKS, return_robustness=True)
    assert out.logits.shape == (7, 6, 64, 64)
    assert torch.isfinite(out.logits).all()
    if fusion == "sgf":
        assert [tuple(r.shape) for r in out.robustness] == [(7, 3, 16 // s, 16 // s) for s in (1, 2, 4, 8)]
    else:
        assert out.robustness is None
    # eval mode: the output must not depend on what a missing modality's tensor holds
    net.eval()
    with torch.no_grad():
        ref = net(x, MASKS).logits
        torch.testing.assert_close(net(with_garbage(x, MASKS), MASKS).logits, ref)


def test_missing_modalities_are_not_encoded():
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", decoder_channels=32)
    seen = []
    net.encoder.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    net(inputs(7), MASKS)
    assert seen == [int(MASKS.sum())]  # one batched pass over the 12 available (sample, modality) pairs


def test_per_modality_encoders_and_conv_stem():
    net = MultiModalSegmentor(
        modalities=MODS,
        num_classes=6,
        backbone="mit_b0",
        shared_encoder=False,
        input_adapter="conv",
        decoder_channels=32,
    )
    assert set(net.encoder.encoders) == {"rgb", "nir", "dsm"}
    out = net(inputs(7), MASKS)
    out.logits.mean().backward()
    assert net.encoder.adapters["dsm"].proj.weight.grad is not None


def test_input_adapter_errors():
    odd = (Modality("hsi", 5, (0.0,) * 5, (1.0,) * 5),)
    with pytest.raises(ValueError, match="input_adapter=conv"):
        MultiModalSegmentor(modalities=odd, num_classes=2, backbone="mit_b0")


def test_input_size_not_multiple_of_32():
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", decoder_channels=32)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        net(inputs(1, size=48), MASKS[-1:])


@pytest.mark.parametrize("name", ["mit_b9", "resnet7", "tu-pvt_v9_b0"])
def test_unknown_backbone(name):
    with pytest.raises(ValueError, match=f"unknown .*backbone '{name}'"):
        validate_backbone_name(name)


def test_local_pretrained_weights(tmp_path):
    torch.manual_seed(1)
    source = build_encoder("mit_b0")
    path = tmp_path / "mit_b0.pth"
    torch.save({f"encoder.{k}": v for k, v in source.state_dict().items()}, path)  # smp model layout
    loaded = build_encoder("mit_b0", pretrained=str(path))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_local_pretrained_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_encoder("mit_b0", pretrained=str(tmp_path / "nope.pth"))
    wrong = tmp_path / "resnet.pth"
    torch.save(build_encoder("resnet18").state_dict(), wrong)
    with pytest.raises(RuntimeError, match="do not fit 'mit_b0'"):
        build_encoder("mit_b0", pretrained=str(wrong))
    other_variant = tmp_path / "mit_b1.pth"  # same keys, wider tensors: named, not a dump of every tensor
    torch.save(build_encoder("mit_b1").state_dict(), other_variant)
    with pytest.raises(RuntimeError, match=r"do not fit 'mit_b0': \d+ tensors have other shapes \(e\.g\. patch_embed1"):
        build_encoder("mit_b0", pretrained=str(other_variant))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read"):
        build_encoder("mit_b0", pretrained=str(broken))


def test_sgf_gradients_reach_every_part():
    torch.manual_seed(0)
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", fusion="sgf", decoder_channels=32)
    out = net(inputs(7), MASKS)
    torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 6, (7, 64, 64))).backward()

    def grad_norm(module: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(net.encoder) > 0
    for scale, fusion in enumerate(net.fusion):
        for part in ("semantic_filter", "spatial", "robustness"):
            assert grad_norm(getattr(fusion, part)) > 0, f"scale {scale}: no gradient in {part}"
        per_modality = fusion.projectors.proj_weight.grad.view(len(MODS), -1).abs().sum(dim=1)
        for m, norm in zip(MODS, per_modality, strict=True):
            assert norm > 0, f"scale {scale}: no gradient in projector {m.name}"


def test_sgf_robustness_through_the_model():
    net = MultiModalSegmentor(modalities=MODS, num_classes=6, backbone="mit_b0", fusion="sgf", decoder_channels=32)
    out = net(inputs(7), MASKS, return_robustness=True)
    for r in out.robustness:
        torch.testing.assert_close(r.sum(dim=1), torch.ones_like(r[:, 0]))
        assert (r[~MASKS] == 0).all()
    assert net(inputs(7), MASKS).robustness is None  # not computed unless asked


@pytest.mark.parametrize("backbone", ["mit_b0", "resnet18"])
def test_channels_last_gives_the_same_model(backbone):
    """model.channels_last=true changes the memory layout of the encoder, the head and SGF's projectors (at every
    scale, as on a GPU), not the numbers: same outputs, and in training the same gradients."""
    from sgma.models.sgf import projector_channels_last

    kw = dict(modalities=MODS, num_classes=6, backbone=backbone, fusion="sgf", decoder_channels=32, dropout=0.0)
    torch.manual_seed(0)
    net = MultiModalSegmentor(**kw)
    torch.manual_seed(0)
    fast = MultiModalSegmentor(**kw, channels_last=True)
    conv = next(m for m in fast.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(f.channels_last for f in fast.fusion) and not any(f.channels_last for f in net.fusion)
    small = torch.zeros(2, 6, 4, 4)  # the stride-32 map of a 128 px crop
    assert projector_channels_last(small, True) and not projector_channels_last(small, False)
    # without the option a GPU keeps NCHW (a meta tensor stands for a non-CPU device); the CPU goes by map size
    assert not projector_channels_last(small.to("meta"), False) and projector_channels_last(small.to("meta"), True)
    assert projector_channels_last(torch.zeros(2, 6, 16, 16), False)
    net.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(inputs(7), MASKS).logits, net(inputs(7), MASKS).logits, atol=1e-4, rtol=1e-4)
    # gradients in float64: in float32 batch-statistics BN on small maps amplifies the layouts' rounding differences
    for model in (net, fast):
        model.double().train()
        torch.manual_seed(1)  # the same stochastic-depth draws
        model({k: v.double() for k, v in inputs(7).items()}, MASKS).logits.square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), fast.parameters(), strict=True):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("training", [True, False])
def test_segformer_head_equals_smp_forward(training):
    """The head computes smp's SegformerDecoder function (embed, upsample, concat, 1x1 fuse) reassociated:
    same outputs, same gradients for the inputs and every parameter, in train (batch-statistics BN) and eval."""
    import torch.nn.functional as F

    from sgma.models.head import SegFormerHead

    torch.manual_seed(0)
    head = SegFormerHead(in_channels=[32, 64, 160, 256], num_classes=6, channels=64).double().train(training)
    head.dropout.p = 0.0  # dropout draws differ between two calls; the function is what is compared
    for p in head.parameters():  # non-trivial BN affine and biases
        p.data.normal_()
    feats = [
        torch.randn(3, c, 24 >> i, 32 >> i, dtype=torch.float64, requires_grad=True)
        for i, c in enumerate([32, 64, 160, 256])
    ]

    def smp_forward() -> torch.Tensor:  # the decoder as smp runs it, with the stub inputs it expects
        stub = feats[0].new_empty(3, 0, 96, 128)
        x = head.decoder([stub, stub[:, :, :1, :1], *feats])
        return F.interpolate(head.classifier(x), size=(96, 128), mode="bilinear", align_corners=False)

    weights = torch.randn(3, 6, 96, 128, dtype=torch.float64)
    ours = head(feats, out_size=(96, 128))
    grads = torch.autograd.grad((ours * weights).sum(), [*feats, *head.parameters()])
    ref = smp_forward()
    ref_grads = torch.autograd.grad((ref * weights).sum(), [*feats, *head.parameters()])
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    assert set(head.state_dict()) >= {"decoder.fuse_stage.0.weight", "decoder.mlp_stage.3.linear.weight"}
