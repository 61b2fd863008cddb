"""SGF: shapes, exact exclusion of missing modalities, gradients, bf16, compile, and exactness against a naive
per-modality, per-pixel reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from einops import rearrange, repeat
from torch.utils._python_dispatch import TorchDispatchMode

from sgma.models.fusion import FusionOutput
from sgma.models.sgf import ModalityProjector, ModalityProjectors, SemanticGuidedFusion

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
    for name in ("projectors", "semantic_filter", "spatial", "robustness"):
        module = sgf.get_submodule(name)
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: missing/NaN grad"
        assert any(g.abs().sum() > 0 for g in grads), f"{name}: zero gradient"
    for name in ("spatial.to_q", "spatial.to_kv", "robustness.to_q", "robustness.to_kv"):
        assert sgf.get_submodule(name).weight.grad.abs().sum() > 0, f"{name}: zero gradient"
    # every modality's own projector parameters (stacked modality-major) receive gradient
    grad = sgf.projectors.proj_weight.grad.view(M, -1)
    assert (grad.abs().sum(dim=1) > 0).all()
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


def naive_sgf(sgf: SemanticGuidedFusion, feats: torch.Tensor, available: torch.Tensor):
    """Reference SGF written the obvious way: one projector per modality applied separately, and every pixel
    its own attention batch with explicit per-pixel prototype copies and keys/values for every token."""
    b, m, _, x, y = feats.shape
    h, k = sgf.num_heads, sgf.num_classes
    zeroed = torch.where(available[:, :, None, None, None], feats, torch.zeros_like(feats))
    tokens = torch.stack([sgf.projectors.single(i)(zeroed[:, i]) for i in range(m)], dim=1)  # (B, M, D, H, W)
    d = tokens.shape[2]
    class_maps = torch.stack([sgf.semantic_filter.classifier(tokens[:, i]) for i in range(m)], dim=1)
    # prototypes: one distribution per class over all available (modality, position)
    logits = rearrange(class_maps, "b m k x y -> b k (m x y)")
    keep = repeat(available, "b m -> b 1 (m x y)", x=x, y=y)
    weights = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    prototypes = weights @ rearrange(tokens, "b m d x y -> b (m x y) d")  # (B, K, D)
    if sgf.class_average == "uniform":
        class_weights = torch.full((b, k, x, y), 1.0 / k, dtype=feats.dtype)
    else:
        posteriors = class_maps.softmax(dim=2) * available[:, :, None, None, None]
        class_weights = posteriors.sum(dim=1) / available.sum(dim=1)[:, None, None, None]

    def attention(module, queries, pixel_tokens, mask):  # queries (N, Q, D), pixel_tokens (N, M, D)
        w_k, w_v = module.to_kv.weight[:, :, 0, 0].chunk(2)
        b_k, b_v = module.to_kv.bias.chunk(2)
        keys, values = pixel_tokens @ w_k.T + b_k, pixel_tokens @ w_v.T + b_v
        q, keys, values = (rearrange(t, "n s (h d) -> n h s d", h=h) for t in (queries, keys, values))
        attn = (q @ keys.transpose(-1, -2) * module.scale).masked_fill(~mask, float("-inf")).softmax(dim=-1)
        out = rearrange(attn @ values, "n h s d -> n s (h d)")
        return out @ module.to_out.weight[:, :, 0, 0].T + module.to_out.bias, attn  # (N, Q, D), (N, h, Q, M)

    pixel_tokens = rearrange(tokens, "b m d x y -> (b x y) m d")
    mask = repeat(available, "b m -> (b x y) 1 1 m", x=x, y=y)
    sp_queries = sgf.spatial.to_q(repeat(prototypes, "b k d -> (b x y) k d", x=x, y=y))  # the copy SGF avoids
    per_class, _ = attention(sgf.spatial, sp_queries, pixel_tokens, mask)  # (N, K, D)
    f_se = (per_class * rearrange(class_weights, "b k x y -> (b x y) k 1")).sum(dim=1)  # (N, D)
    rp_queries = f_se @ sgf.robustness.to_q.weight[:, :, 0, 0].T + sgf.robustness.to_q.bias
    fused, attn = attention(sgf.robustness, rp_queries[:, None], pixel_tokens, mask)
    fused = rearrange(fused[:, 0], "(b x y) d -> b d x y", b=b, x=x, y=y)
    robustness = rearrange(attn.mean(dim=1)[:, 0], "(b x y) m -> b m x y", b=b, x=x, y=y)
    assert d == sgf.embed_dim
    return fused, robustness


@pytest.mark.parametrize("class_average", ["uniform", "weighted"])
@pytest.mark.parametrize("heads", [1, 4])
def test_sgf_matches_naive_reference(class_average: str, heads: int) -> None:
    """The grouped projectors, the folded keys/values and the batched contractions change no number."""
    sgf = make_sgf(class_average=class_average, num_heads=heads).double()
    feats = corrupt(make_feats(7).double(), PATTERNS, "random")
    with torch.no_grad():
        expected_fused, expected_robustness = naive_sgf(sgf, feats, PATTERNS)
        out = sgf(feats, PATTERNS, return_robustness=True)
    torch.testing.assert_close(out.fused, expected_fused, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.robustness, expected_robustness, atol=1e-10, rtol=1e-10)


def test_prepared_tokens_can_be_fused_again_under_fewer_modalities() -> None:
    """A token depends on its own slot only: fusing the main pass's tokens under a one-modality availability
    (what the MAS branch does) equals fusing that modality alone from the features."""
    sgf = make_sgf(class_average="weighted").double()
    feats = make_feats(7).double()
    tokens = sgf.prepare(feats, PATTERNS)
    drawn = PATTERNS.float().argmax(dim=1)  # an available modality of every sample
    alone = torch.nn.functional.one_hot(drawn, M).bool()
    again = sgf.fuse(tokens, alone, return_robustness=True)
    direct = sgf(feats, alone, return_robustness=True)
    torch.testing.assert_close(again.fused, direct.fused, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(again.robustness, direct.robustness, atol=0, rtol=0)


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


@pytest.mark.parametrize("size", [(2, 2), (3, 5), (6, 6), (16, 16), (32, 32)])
def test_grouped_projectors_equal_separate_per_modality_projectors(size):
    """One grouped computation (merged and cropped depthwise kernel, M*G-group norm, grouped 1x1) equals
    each modality's projector run on its own with three separate branch convs, in values and gradients
    (16 x 16 and 32 x 32 run the CPU's channels-last path)."""
    torch.manual_seed(0)
    projectors = ModalityProjectors(num_modalities=M, in_channels=8, embed_dim=12, norm_groups=4).double()
    feats = torch.randn(2, M, 8, *size, dtype=torch.float64, requires_grad=True)
    available = torch.ones(2, M, dtype=torch.bool)
    grouped = projectors(feats, available)  # (B, D, M, H, W)
    singles = [projectors.single(i) for i in range(M)]
    separate = torch.stack([p(feats[:, i]) for i, p in enumerate(singles)], dim=2)
    torch.testing.assert_close(grouped, separate)
    cotangent = torch.randn_like(grouped)
    (grad_grouped,) = torch.autograd.grad(grouped, feats, cotangent, retain_graph=True)
    (grad_separate,) = torch.autograd.grad(separate, feats, cotangent, retain_graph=True)
    torch.testing.assert_close(grad_grouped, grad_separate)
    (grouped * cotangent).sum().backward()
    (separate * cotangent).sum().backward()
    c = 8
    for j in range(3):
        stacked_grad = getattr(projectors, f"kernel{j}_weight").grad
        for i, single in enumerate(singles):
            torch.testing.assert_close(stacked_grad[i * c : (i + 1) * c], single.branches[j].weight.grad)
    for i, single in enumerate(singles):
        torch.testing.assert_close(projectors.proj_weight.grad[i * 12 : (i + 1) * 12], single.proj.weight.grad)
        torch.testing.assert_close(projectors.norm_weight.grad[i * c : (i + 1) * c], single.norm.weight.grad)


def test_projectors_initialise_like_separate_modules():
    """Same seed, same numbers as M separately built ModalityProjector modules (the former layout)."""
    torch.manual_seed(3)
    projectors = ModalityProjectors(num_modalities=M, in_channels=8, embed_dim=12)
    torch.manual_seed(3)
    separate = [ModalityProjector(in_channels=8, embed_dim=12) for _ in range(M)]
    for i, single in enumerate(separate):
        for key, value in projectors.single(i).state_dict().items():
            torch.testing.assert_close(value, single.state_dict()[key])


def test_per_modality_state_dict_still_loads():
    """A checkpoint of the former per-modality layout (projectors.<m>.branches.<j>.weight ...) loads."""
    sgf = make_sgf()
    old_layout = {k: v for k, v in sgf.state_dict().items() if not k.startswith("projectors.")}
    for i in range(M):
        old_layout.update({f"projectors.{i}.{k}": v for k, v in sgf.projectors.single(i).state_dict().items()})
    torch.manual_seed(123)
    fresh = SemanticGuidedFusion(in_channels=C, num_modalities=M, num_classes=K, num_heads=2)
    fresh.load_state_dict(old_layout)
    feats = make_feats(7)
    with torch.no_grad():
        torch.testing.assert_close(fresh(feats, PATTERNS).fused, sgf(feats, PATTERNS).fused)


@pytest.mark.parametrize("class_average", ["uniform", "weighted"])
@pytest.mark.parametrize("heads", [1, 4])
def test_fuse_single_equals_fuse_under_one_modality(class_average: str, heads: int) -> None:
    """The MAS branch's closed form: with one available modality per sample, SGF is RP's value and output
    projections of that token. Same output as the full fusion, and the same gradients for the tokens and every
    parameter; the parts it skips (class maps, prototypes, SP, RP's query and keys) get exactly zero gradient
    from the full fusion, so skipping them changes nothing."""
    sgf = make_sgf(class_average=class_average, num_heads=heads).double()
    for p in sgf.parameters():  # non-trivial biases
        p.data.normal_(0, 0.3)
    tokens = sgf.prepare(make_feats(7).double(), PATTERNS).detach().requires_grad_()
    drawn = torch.tensor([0, 2, 1, 1, 0, 2, 1])  # includes samples that lack their drawn modality
    alone = torch.nn.functional.one_hot(drawn, M).bool()
    params = dict(sgf.named_parameters())
    cotangent = torch.randn(7, sgf.embed_dim, H, W, dtype=torch.float64)
    full = sgf.fuse(tokens, alone, return_robustness=False).fused
    full_grads = torch.autograd.grad(full, [tokens, *params.values()], cotangent, allow_unused=True)
    single = sgf.fuse_single(tokens, alone)
    assert single.robustness is None
    single_grads = torch.autograd.grad(single.fused, [tokens, *params.values()], cotangent, allow_unused=True)
    torch.testing.assert_close(single.fused, full)
    for name, g_full, g_single in zip(["tokens", *params], full_grads, single_grads, strict=True):
        if g_single is None:  # skipped by the closed form: the full fusion gives it nothing either
            assert g_full is None or torch.count_nonzero(g_full) == 0, name
        else:
            torch.testing.assert_close(g_single, g_full, msg=name)
    assert {n for n, g in zip(params, single_grads[1:], strict=True) if g is not None} == {
        "robustness.to_kv.weight",
        "robustness.to_kv.bias",
        "robustness.to_out.weight",
        "robustness.to_out.bias",
    }


def test_fuse_single_compiles_without_graph_breaks() -> None:
    """The MAS branch's closed form traces as one graph (model.compile runs it inside fuse_decode)."""
    sgf = make_sgf()
    tokens = sgf.prepare(make_feats(7), PATTERNS).detach()
    alone = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 1, 0, 2, 1]), M).bool()
    torch._dynamo.reset()
    compiled = torch.compile(sgf.fuse_single, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, alone).fused, sgf.fuse_single(tokens, alone).fused)
