"""SGF: shapes, exact exclusion of missing modalities, gradients, bf16, compile, and the einsum path."""

from __future__ import annotations

import itertools

import pytest
import torch
from einops import rearrange, repeat
from torch.utils._python_dispatch import TorchDispatchMode

from sgma.models.fusion import FusionOutput
from sgma.models.sgf import SemanticGuidedFusion

C, K, M, H, W = 32, 6, 3, 16, 16

# every non-empty pattern of 3 modalities, one per sample
PATTERNS = torch.tensor([p for p in itertools.product([False, True], repeat=M) if any(p)])  # (7, M)


def make_sgf(**kwargs) -> SemanticGuidedFusion:
    torch.manual_seed(0)
    options = {"in_channels": C, "num_modalities": M, "num_classes": K, "num_heads": 2} | kwargs
    return SemanticGuidedFusion(**options)


def make_feats(batch: int, channels: int = C, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, M, channels, H, W, generator=generator)


def corrupt(feats: torch.Tensor, available: torch.Tensor, kind: str) -> torch.Tensor:
    """Overwrite missing slots with garbage of the given kind."""
    garbage = {
        "random": torch.randn_like(feats) * 3.0 + 1.0,
        "large": torch.full_like(feats, 1e30),
        "nan": torch.full_like(feats, float("nan")),
    }[kind]
    return torch.where(available[:, :, None, None, None], feats, garbage)


@pytest.mark.parametrize(("channels", "embed_dim", "heads"), [(32, None, 1), (32, 48, 4), (16, 64, 8)])
def test_output_shapes(channels: int, embed_dim: int | None, heads: int) -> None:
    sgf = make_sgf(in_channels=channels, embed_dim=embed_dim, num_heads=heads)
    out = sgf(make_feats(7, channels), PATTERNS, return_robustness=True)
    d = channels if embed_dim is None else embed_dim
    assert isinstance(out, FusionOutput)
    assert sgf.out_channels == d
    assert out.fused.shape == (7, d, H, W)
    assert out.robustness is not None and out.robustness.shape == (7, M, H, W)


def test_robustness_not_computed_unless_asked() -> None:
    out = make_sgf()(make_feats(7), PATTERNS)
    assert out.robustness is None


@pytest.mark.parametrize("class_average", ["uniform", "weighted"])
def test_robustness_is_a_distribution_over_available(class_average: str) -> None:
    out = make_sgf(class_average=class_average)(make_feats(7), PATTERNS, return_robustness=True)
    r = out.robustness
    missing = ~PATTERNS[:, :, None, None].expand_as(r)
    assert torch.all(r[missing] == 0), "missing modalities must have exactly zero robustness"
    assert torch.all(r[~missing] > 0)
    torch.testing.assert_close(r.sum(dim=1), torch.ones(7, H, W), atol=1e-6, rtol=0)
    assert torch.isfinite(out.fused).all()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["random", "large", "nan"])
def test_missing_slots_cannot_influence_anything(kind: str, train: bool) -> None:
    sgf = make_sgf(class_average="weighted").train(train)
    feats = make_feats(7)
    clean = sgf(feats, PATTERNS, return_robustness=True)
    dirty = sgf(corrupt(feats, PATTERNS, kind), PATTERNS, return_robustness=True)
    torch.testing.assert_close(dirty.fused, clean.fused, atol=1e-6, rtol=0)
    torch.testing.assert_close(dirty.robustness, clean.robustness, atol=1e-6, rtol=0)
    assert torch.isfinite(dirty.fused).all() and torch.isfinite(dirty.robustness).all()


def test_sample_result_does_not_depend_on_batch_mates() -> None:
    """Per-sample norms: a sample fused alone equals the same sample fused in a mixed batch (train mode)."""
    sgf = make_sgf().train()
    feats = make_feats(7)
    batched = sgf(feats, PATTERNS, return_robustness=True)
    for i in (0, 3, 6):
        alone = sgf(feats[i : i + 1], PATTERNS[i : i + 1], return_robustness=True)
        torch.testing.assert_close(alone.fused, batched.fused[i : i + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.robustness, batched.robustness[i : i + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("only", range(M))
def test_single_available_modality(only: int) -> None:
    available = torch.zeros(2, M, dtype=torch.bool)
    available[:, only] = True
    feats = corrupt(make_feats(2), available, "nan")
    out = make_sgf()(feats, available, return_robustness=True)
    assert torch.isfinite(out.fused).all()
    assert torch.equal(out.robustness[:, only], torch.ones(2, H, W))
    assert torch.equal(out.robustness.sum(dim=1), torch.ones(2, H, W))


def test_gradients_reach_every_submodule() -> None:
    sgf = make_sgf(class_average="weighted")
    feats = corrupt(make_feats(7), PATTERNS, "nan").requires_grad_()
    sgf(feats, PATTERNS).fused.sum().backward()
    for name in ("projectors.0", "projectors.1", "projectors.2", "semantic_filter", "spatial", "robustness"):
        module = sgf.get_submodule(name)
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: missing/NaN grad"
        assert any(g.abs().sum() > 0 for g in grads), f"{name}: zero gradient"
    for name in ("spatial.to_q", "spatial.to_kv", "robustness.to_q", "robustness.to_kv"):
        assert sgf.get_submodule(name).weight.grad.abs().sum() > 0, f"{name}: zero gradient"
    assert torch.isfinite(feats.grad).all()
    assert torch.all(feats.grad[~PATTERNS] == 0), "missing slots must receive exactly zero gradient"


def test_bf16_autocast() -> None:
    sgf = make_sgf(class_average="weighted")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sgf(corrupt(make_feats(7), PATTERNS, "nan"), PATTERNS, return_robustness=True)
    assert torch.isfinite(out.fused).all() and torch.isfinite(out.robustness).all()
    assert torch.all(out.robustness[~PATTERNS[:, :, None, None].expand_as(out.robustness)] == 0)
    torch.testing.assert_close(out.robustness.sum(dim=1).float(), torch.ones(7, H, W), atol=1e-2, rtol=0)


# torch's own inductor import touches the deprecated torch.jit.script_method (torch/utils/mkldnn.py)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_torch_compile_matches_eager() -> None:
    sgf = make_sgf(class_average="weighted").eval()
    feats = make_feats(7)
    with torch.no_grad():
        eager = sgf(feats, PATTERNS, return_robustness=True)
        compiled = torch.compile(sgf)(feats, PATTERNS, return_robustness=True)
    torch.testing.assert_close(compiled.fused, eager.fused, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.robustness, eager.robustness, atol=1e-5, rtol=0)


def test_class_average_modes_differ() -> None:
    feats = make_feats(7)
    uniform = make_sgf(class_average="uniform")(feats, PATTERNS).fused
    weighted = make_sgf(class_average="weighted")(feats, PATTERNS).fused  # same seed -> same weights
    assert torch.isfinite(uniform).all() and torch.isfinite(weighted).all()
    assert not torch.allclose(uniform, weighted)


@pytest.mark.parametrize("kwargs", [{"num_heads": 5}, {"embed_dim": 30, "num_heads": 4}, {"num_heads": 0}])
def test_bad_num_heads_is_a_clear_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        make_sgf(**kwargs)


def test_bad_class_average_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="class_average"):
        make_sgf(class_average="max")


def naive_spatial_perceptron(sgf: SemanticGuidedFusion, feats: torch.Tensor, available: torch.Tensor):
    """Reference SP with explicit per-pixel prototype copies: each pixel is its own attention batch."""
    sp, b, h = sgf.spatial, feats.shape[0], sgf.num_heads
    tokens = sgf.tokens(feats, available)  # (B, M, D, H, W)
    class_maps = sgf.semantic_filter(tokens)
    prototypes = sgf.prototypes(tokens, class_maps, available)  # (B, K, D)
    class_weights = sgf.class_weights(class_maps, available)  # (B, K, H, W)

    per_pixel_protos = repeat(prototypes, "b k d -> (b x y) k d", x=H, y=W)  # the copy the module avoids
    pixel_tokens = rearrange(tokens, "b m d x y -> (b x y) m d")
    q = sp.to_q(per_pixel_protos)  # (N, K, D)
    k_weight, v_weight = sp.to_kv.weight[:, :, 0, 0].chunk(2)
    k_bias, v_bias = sp.to_kv.bias.chunk(2)
    k = pixel_tokens @ k_weight.T + k_bias  # (N, M, D)
    v = pixel_tokens @ v_weight.T + v_bias
    q, k, v = (rearrange(t, "n s (h d) -> n h s d", h=h) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * sp.scale  # (N, h, K, M)
    mask = repeat(available, "b m -> (b x y) 1 1 m", x=H, y=W)
    attn = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = rearrange(attn @ v, "n h k d -> n k (h d)")  # (N, K, D)
    out = out @ sp.to_out.weight[:, :, 0, 0].T + sp.to_out.bias  # per-class outputs
    weights = rearrange(class_weights, "b k x y -> (b x y) k 1")
    f_se = (out * weights).sum(dim=1)  # class average, (N, D)
    return rearrange(f_se, "(b x y) d -> b d x y", b=b, x=H, y=W), tokens, prototypes, class_weights


@pytest.mark.parametrize("class_average", ["uniform", "weighted"])
@pytest.mark.parametrize("heads", [1, 4])
def test_einsum_spatial_perceptron_matches_naive_reference(class_average: str, heads: int) -> None:
    sgf = make_sgf(class_average=class_average, num_heads=heads).double()
    feats = make_feats(7).double()
    with torch.no_grad():
        expected, tokens, prototypes, class_weights = naive_spatial_perceptron(sgf, feats, PATTERNS)
        actual = sgf.spatial(prototypes, tokens, PATTERNS, class_weights)
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = (0, "", ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func), tuple(t.shape))
        return out


@pytest.mark.parametrize("class_average", ["uniform", "weighted"])
def test_no_per_pixel_prototype_copies(class_average: str) -> None:
    """With many classes, nothing of size B*K*D*H*W may appear (only K*M*H*W-sized attention maps)."""
    b, k, d, heads = 2, 24, 32, 2
    sgf = SemanticGuidedFusion(
        in_channels=C, num_modalities=M, num_classes=k, num_heads=heads, class_average=class_average
    )
    recorder = LargestOutput()
    with torch.no_grad(), recorder:
        sgf(make_feats(b), torch.ones(b, M, dtype=torch.bool), return_robustness=True)
    numel, op, shape = recorder.largest
    assert numel <= max(2 * b * M * d * H * W, b * heads * k * M * H * W), f"{op} made {shape}"
    assert numel < b * k * d * H * W


@pytest.mark.parametrize("size", [(2, 2), (3, 5), (6, 6), (16, 16)])
def test_merged_projector_equals_separate_branches(size):
    """The single merged (and cropped) depthwise conv is exactly the sum of the three branch convs."""
    from sgma.models.sgf import ModalityProjector

    torch.manual_seed(0)
    proj = ModalityProjector(in_channels=8, embed_dim=8).double()
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    merged = proj(x)
    separate = proj.proj(proj.act(proj.norm(sum(branch(x) for branch in proj.branches))))
    torch.testing.assert_close(merged, separate)
    g_merged = torch.autograd.grad(merged.sum(), [x, *(b.weight for b in proj.branches)])
    g_separate = torch.autograd.grad(separate.sum(), [x, *(b.weight for b in proj.branches)])
    for a, b in zip(g_merged, g_separate, strict=True):
        torch.testing.assert_close(a, b)
