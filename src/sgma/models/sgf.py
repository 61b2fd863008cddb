"""SGF (Semantic-Guided Fusion): the per-scale fusion of SGMA, robust to missing modalities.

Pipeline at one scale (see ``docs/METHOD.md``), for features (B, M, C, H, W) and availability (B, M):

1. :class:`ModalityProjectors` (one projector per modality) -> modality tokens x_m, (B, D, M, H, W).
2. :class:`SemanticFilter` (shared 1x1 conv) -> class response maps c_m, (B, K, M, H, W).
3. :class:`SemanticPrototypes` -> one D-dim prototype per class, pooled over every available modality and
   position (B, K, D).
4. :class:`SpatialPerceptron`: at every pixel the K prototypes attend over that pixel's available modality
   tokens; averaged over classes -> semantic reference f_se (B, D, H, W).
5. :class:`RobustnessPerceptron`: f_se attends over the modality tokens; the output is the fused feature,
   the head-averaged attention weights are the robustness maps r (B, M, H, W).

Step 1 is :meth:`SemanticGuidedFusion.prepare`, steps 2-5 :meth:`SemanticGuidedFusion.fuse` (see
:mod:`sgma.models.fusion`): a token depends only on its own (sample, modality) slot, so the MAS branch fuses
the main pass's tokens under its one-modality availability without running the projectors again, and with one
modality per sample steps 2-5 reduce exactly to RP's value and output projections
(:meth:`SemanticGuidedFusion.fuse_single`).

Missing modalities are excluded everywhere by masking, never by their values: their inputs are replaced by
exact zeros before any arithmetic (so NaN/inf garbage cannot leak and their tokens stay finite), and every
softmax over modalities or positions fills their logits with -inf first, so their weights are exactly 0 and
they receive exactly zero gradient.

Choices that are ours where the paper is silent:

- **Projector merge and norm**: the three depthwise branches (11x11, 7x7, 3x3) are summed, then
  **GroupNorm** + GELU, then a 1x1 conv to the embedding dim. GroupNorm normalises each sample on its own,
  so the zeroed slot of a missing modality never enters another sample's statistics, train or eval, and
  every projector can still run on the whole batch with static shapes (``torch.compile`` friendly). This
  rules out BatchNorm, whose batch statistics would mix in the missing samples (and is noisy at the
  paper's batch of 2 per GPU). The cost is that projectors also run on missing slots; their output is
  never used.
- **Embedding dim**: ``embed_dim`` defaults to the scale's input channels capped at 512, so the fused map
  keeps the encoder's channel count for MiT/PVT-v2 and wide ResNet stages are projected down.
- **Prototype normalisation**: the printed equation is dimensionally inconsistent; we use OCRNet-style
  region pooling, a softmax of each class map over all positions of all available modalities jointly
  (one distribution per class), times the modality tokens.
- **Class average in SP**: ``"uniform"`` (1/K per class query) or ``"weighted"`` (per-pixel class
  posteriors softmax_K(c_m), averaged over the available modalities).
- **Attention layout**: standard multi-head scaled dot-product attention with linear q/k/v and output
  projections (bias on), no residual, norm or MLP around it; SP and RP have separate parameters. Softmaxes
  run in float32 for stable masking under bf16 autocast.

Efficiency (all rewrites are exact reorderings of linear maps with the same parameters, tested against a
naive per-pixel, per-modality reference in ``tests/test_sgf.py``):

- **Few, large kernels.** The M projectors run as one grouped computation over (B, M*C, H, W): one depthwise
  conv (the three branches merged into one kernel, convolution being linear in the kernel), one GroupNorm
  with M*G groups, one grouped 1x1 conv; each modality keeps its own parameters, stored side by side. The
  attentions contract over modalities with batched matmuls and broadcasts, never a Python loop over M.
- **Token layout (B, D, M, H, W).** With channels first, the class maps of all modalities are one 1x1 conv,
  SP's logits of all modalities are one batched matmul per image, and the prototype pooling is one matmul
  over the joint (M, H, W) axis.
- **No per-pixel prototype copies.** Prototypes are projected once per image, and the class average is
  applied to the SP attention weights before they meet the values, so the only K-sized per-pixel tensor is
  the attention map, O(B*heads*K*M*H*W); nothing of size K*D*H*W is materialised.
- **No per-token keys or values.** The key projection is folded into the queries (q . (W_k x + b_k) =
  (W_k^T q) . x + const, and the constant cancels in the softmax over modalities); the value projection is
  applied once to the attention-weighted token sum (the weights sum to 1). Each attention runs 2 per-pixel
  projections instead of M+1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sgma.checks import check_count
from sgma.models.fusion import Fusion, FusionOutput, zero_missing

ClassAverage = Literal["uniform", "weighted"]

# embed_dim=None keeps each scale's channels up to this cap: MiT/PVT-v2 (<= 512 channels) are unchanged and
# SGF adds the paper's ~4.8 M parameters on PVT-v2-b2; ResNet-50's 2048-channel stage would otherwise cost
# ~46 M parameters in that one scale's attentions.
DEFAULT_MAX_EMBED_DIM = 512

# On CPU the projectors run channels-last on maps of at least this many pixels: oneDNN's depthwise-conv weight
# gradient is 2-3x faster there in NHWC (fwd+bwd of the stride-4 projector conv at 128 px, (8, 3x32, 32, 32),
# 11x11: 46 -> 17 ms with 2 threads, 80 -> 33 ms with 1) and 2-4x slower on the small deep maps (3x160
# channels at 8 x 8: 14 -> 25 ms). SGMA steps at 128 px x 8 (mit_b0, each an A/B in one process): with 2
# threads 443 ms (never) vs 407 (>= 32 x 32), then 365 (>= 32 x 32) vs 358 (>= 16 x 16); with 1 thread 562
# (>= 32 x 32) vs 528 (>= 16 x 16). The numbers are the same up to rounding.
CPU_CHANNELS_LAST_MIN_PIXELS = 256


def projector_channels_last(x: Tensor, requested: bool) -> bool:
    """Whether the projectors' convolutions run channels-last: always when ``model.channels_last=true`` (on a GPU
    only then does the depthwise conv reach cuDNN: PyTorch sends NCHW bf16/fp32 depthwise convs to its own
    generic kernels), else on CPU from :data:`CPU_CHANNELS_LAST_MIN_PIXELS`."""
    return requested or (x.device.type == "cpu" and x.shape[-2] * x.shape[-1] >= CPU_CHANNELS_LAST_MIN_PIXELS)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16 (a bf16 softmax loses the 1-sum), the input dtype otherwise (float64 stays)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, skipped in Python when it already has it (a no-op ``to`` still costs a dispatch)."""
    return x if x.dtype == dtype else x.to(dtype)


def masked_softmax(logits: Tensor, missing: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` without the ``missing`` entries (a mask broadcasting against ``logits``).

    Missing entries are filled with -inf first, so their weights are exactly 0 whatever their logits held
    (NaN included), as long as every slice along ``dim`` keeps one finite available entry. Computed and
    returned in float32 at least.
    """
    return logits.masked_fill(missing, float("-inf")).softmax(dim, dtype=softmax_dtype(logits.dtype))


class ModalityProjector(nn.Module):
    """MP of one modality: multi-scale depthwise context (11x11 + 7x7 + 3x3, summed), GroupNorm + GELU, 1x1
    to the embed dim.

    Large depthwise kernels give each modality a wide, cheap receptive field before the per-pixel
    attention, which otherwise sees one pixel at a time. SGF runs all modalities' projectors at once
    (:class:`ModalityProjectors`); this single-modality module defines the computation and initialises them.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        embed_dim: int,
        kernel_sizes: tuple[int, ...] = (11, 7, 3),
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        assert all(k % 2 == 1 for k in kernel_sizes), f"kernel sizes must be odd, got {kernel_sizes}"
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, kernel_size=k, padding=k // 2, groups=in_channels) for k in kernel_sizes
        )
        self.norm = nn.GroupNorm(math.gcd(norm_groups, in_channels), in_channels)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, D, H, W)
        context = sum(branch(x) for branch in self.branches)
        return self.proj(self.act(self.norm(context)))


def merge_kernels(weights: list[Tensor], biases: list[Tensor], h: int, w: int) -> tuple[Tensor, Tensor]:
    """Parallel depthwise branches as one depthwise kernel (exact: convolution is linear in the kernel).

    One large-kernel conv instead of three halves the cost of the projector; gradients reach each branch's
    parameters exactly as with separate convs. Taps farther than (H-1, W-1) from the centre only ever meet
    zero padding, so the kernel is cropped to (2H-1, 2W-1) on small maps (the stride-32 scale of a 64-128 px
    crop), where an 11x11 kernel is mostly padding.
    """
    k = max(t.shape[-1] for t in weights)
    padded = [t if t.shape[-1] == k else F.pad(t, [(k - t.shape[-1]) // 2] * 4) for t in weights]
    weight, bias = padded[0], biases[0]
    for t, b in zip(padded[1:], biases[1:], strict=True):  # not sum(): it would start with a `0 + tensor` op
        weight, bias = weight + t, bias + b
    kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
    if (kh, kw) != (k, k):
        top, left = (k - kh) // 2, (k - kw) // 2
        weight = weight[..., top : top + kh, left : left + kw]
    return weight, bias


class ModalityProjectors(nn.Module):
    """The M modality projectors run as one grouped computation: (B, M, C, H, W) -> tokens (B, D, M, H, W).

    Each modality keeps its own parameters (initialised exactly as M separate :class:`ModalityProjector`
    modules would be); they are stored stacked on the channel axis, modality-major, so one depthwise conv over
    (B, M*C, H, W), one GroupNorm with M*G groups (groups never straddle two modalities) and one 1x1 conv with
    M groups compute all M projectors. State dicts of the former per-modality layout
    (``projectors.<m>.branches.<j>.weight`` ...) still load: they are stacked on the fly.
    """

    def __init__(
        self,
        *,
        num_modalities: int,
        in_channels: int,
        embed_dim: int,
        kernel_sizes: tuple[int, ...] = (11, 7, 3),
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        single = [
            ModalityProjector(
                in_channels=in_channels, embed_dim=embed_dim, kernel_sizes=kernel_sizes, norm_groups=norm_groups
            )
            for _ in range(num_modalities)
        ]
        self.num_modalities = num_modalities
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.kernel_sizes = tuple(kernel_sizes)
        self.norm_groups = single[0].norm.num_groups  # per modality
        self.eps = single[0].norm.eps
        for name, stacked in stack_projectors([p.state_dict() for p in single], len(kernel_sizes)).items():
            self.register_parameter(name, nn.Parameter(stacked))
        self.register_load_state_dict_pre_hook(_load_per_modality_projectors)

    def forward(self, feats: Tensor, available: Tensor, *, channels_last: bool = False) -> Tensor:
        b, m, c, h, w = feats.shape
        x = zero_missing(feats, available).reshape(b, m * c, h, w)
        if projector_channels_last(x, channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        weights = [getattr(self, f"kernel{j}_weight") for j in range(len(self.kernel_sizes))]
        biases = [getattr(self, f"kernel{j}_bias") for j in range(len(self.kernel_sizes))]
        weight, bias = merge_kernels(weights, biases, h, w)
        kh, kw = weight.shape[-2:]
        x = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=m * c)
        x = F.gelu(F.group_norm(x, m * self.norm_groups, self.norm_weight, self.norm_bias, self.eps))
        x = F.conv2d(x, self.proj_weight, self.proj_bias, groups=m)  # (B, M*D, H, W)
        return x.view(b, m, self.embed_dim, h, w).transpose(1, 2).contiguous()  # (B, D, M, H, W)

    def single(self, index: int) -> ModalityProjector:
        """Modality ``index``'s projector as a stand-alone :class:`ModalityProjector` (a copy)."""
        proj = ModalityProjector(
            in_channels=self.in_channels,
            embed_dim=self.embed_dim,
            kernel_sizes=self.kernel_sizes,
            norm_groups=self.norm_groups,
        ).to(self.proj_weight)
        c, d = self.in_channels, self.embed_dim
        state = {}
        for j in range(len(self.kernel_sizes)):
            state[f"branches.{j}.weight"] = getattr(self, f"kernel{j}_weight")[index * c : (index + 1) * c]
            state[f"branches.{j}.bias"] = getattr(self, f"kernel{j}_bias")[index * c : (index + 1) * c]
        state["norm.weight"] = self.norm_weight[index * c : (index + 1) * c]
        state["norm.bias"] = self.norm_bias[index * c : (index + 1) * c]
        state["proj.weight"] = self.proj_weight[index * d : (index + 1) * d]
        state["proj.bias"] = self.proj_bias[index * d : (index + 1) * d]
        proj.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return proj


def stack_projectors(states: list[dict[str, Tensor]], num_branches: int) -> dict[str, Tensor]:
    """Per-modality :class:`ModalityProjector` state dicts -> the stacked parameters of
    :class:`ModalityProjectors` (modality-major along the channel axis)."""

    def cat(key: str) -> Tensor:
        return torch.cat([s[key].detach() for s in states])

    stacked = {}
    for j in range(num_branches):
        stacked[f"kernel{j}_weight"] = cat(f"branches.{j}.weight")
        stacked[f"kernel{j}_bias"] = cat(f"branches.{j}.bias")
    stacked.update(
        norm_weight=cat("norm.weight"),
        norm_bias=cat("norm.bias"),
        proj_weight=cat("proj.weight"),
        proj_bias=cat("proj.bias"),
    )
    return stacked


def _load_per_modality_projectors(module: ModalityProjectors, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: stack the former per-modality keys (``<prefix><m>.proj.weight`` ...)."""
    if f"{prefix}0.proj.weight" not in state_dict:
        return
    per_modality = []
    for m in range(module.num_modalities):
        head = f"{prefix}{m}."
        keys = [k for k in state_dict if k.startswith(head)]
        per_modality.append({k[len(head) :]: state_dict.pop(k) for k in keys})
    state_dict.update({prefix + k: v for k, v in stack_projectors(per_modality, len(module.kernel_sizes)).items()})


class SemanticFilter(nn.Module):
    """CSF: one 1x1 conv shared by all modalities, so class maps of different modalities are comparable."""

    def __init__(self, *, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, D, M, H, W) -> (B, K, M, H, W)
        b, d, m, h, w = tokens.shape
        # the modality axis folds into the image height: one 1x1 conv for every modality at once
        return self.classifier(tokens.view(b, d, m * h, w)).view(b, -1, m, h, w)


class SemanticPrototypes(nn.Module):
    """Global class prototypes, pooled jointly over all positions of all available modalities.

    Each class map is turned into one spatial distribution over (M, H, W) by a masked softmax, so a
    prototype is a convex combination of available tokens only (OCRNet-style region pooling).
    """

    def forward(self, tokens: Tensor, class_maps: Tensor, missing: Tensor) -> Tensor:
        # tokens (B, D, M, H, W), class_maps (B, K, M, H, W), missing (B, 1, M, 1, 1) -> prototypes (B, K, D)
        b, d = tokens.shape[:2]
        k = class_maps.shape[1]
        logits = class_maps.masked_fill(missing, float("-inf"))
        weights = logits.view(b, k, -1).softmax(-1, dtype=softmax_dtype(logits.dtype))  # (B, K, M*H*W)
        return torch.bmm(cast(weights, tokens.dtype), tokens.view(b, d, -1).transpose(1, 2))


def mix_tokens(attn: Tensor, tokens: Tensor) -> Tensor:
    """sum_m attn[:, h, m] * tokens[:, :, m]: (B, h, M, H, W) x (B, D, M, H, W) -> (B, h*D, H, W).

    One head (the default) is a broadcast multiply and a sum over M; several heads use an einsum, which
    avoids a (B, h, D, M, H, W) temporary.
    """
    attn = cast(attn, tokens.dtype)
    if attn.shape[1] == 1:
        return (tokens * attn).sum(dim=2)
    return torch.einsum("bhmxy,bcmxy->bhcxy", attn, tokens).flatten(1, 2)


def split_kv(to_kv: nn.Conv2d, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The key and value projections of a fused 1x1 ``to_kv`` conv: W_k (h, d, D) per head, W_v as a grouped
    1x1 conv weight (h*d, D, 1, 1) and b_v (h*d,).

    The key bias is not returned: it only adds ``q . b_k`` to every modality's logit at a pixel, a constant
    that the softmax over modalities cancels.
    """
    dim = to_kv.weight.shape[1]
    w_k, w_v = to_kv.weight.split(dim)
    return w_k.view(num_heads, dim // num_heads, dim), w_v, to_kv.bias[dim:]


def project_values(mixed: Tensor, w_v: Tensor, b_v: Tensor, num_heads: int) -> Tensor:
    """Per-head value projection of already-mixed tokens, one grouped 1x1 conv: (B, h*D, H, W) -> (B, D, H, W).

    Exact reassociation: attention weights sum to 1 over modalities, so
    sum_m a_m (W_v x_m + b_v) = W_v (sum_m a_m x_m) + b_v, which projects once instead of once per modality.
    """
    return F.conv2d(mixed, w_v, b_v, groups=num_heads)


class SpatialPerceptron(nn.Module):
    """SP: at every pixel the K prototypes query that pixel's available modality tokens.

    Standard multi-head attention (q from the prototypes, k/v linear in the tokens, output projection),
    evaluated without materialising keys or values for every token: the key projection is folded into the
    K queries once per image (q . W_k x = (W_k^T q) . x), and the value projection is applied after the
    attention-weighted sum (see :func:`project_values`). The class average is applied to the attention
    weights before the values; all three rewrites are exact because they only reorder linear maps.
    """

    def __init__(self, *, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (embed_dim // num_heads) ** -0.5
        self.to_q = nn.Linear(embed_dim, embed_dim)
        self.to_kv = nn.Conv2d(embed_dim, 2 * embed_dim, kernel_size=1)
        self.to_out = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(
        self, prototypes: Tensor, tokens: Tensor, missing: Tensor, class_weights: Tensor | None = None
    ) -> Tensor:
        # prototypes (B, K, D), tokens (B, D, M, H, W), missing (B, 1, M, 1, 1), class_weights (B, K, H, W)
        # summing to 1 over K, or None for the uniform 1/K -> f_se (B, D, H, W)
        b, dim, m, x, y = tokens.shape
        k, h = prototypes.shape[1], self.num_heads
        w_k, w_v, b_v = split_kv(self.to_kv, h)
        q = self.to_q(prototypes)  # (B, K, D), once per image, not per pixel
        if h == 1:  # keys folded into the queries: (W_k^T q) . x
            q_tokens = torch.matmul(q, cast(w_k[0], q.dtype) * self.scale)  # (B, K, D)
        else:
            q_tokens = torch.einsum("bkhd,hdc->bhkc", q.view(b, k, h, dim // h), cast(w_k, q.dtype) * self.scale)
            q_tokens = q_tokens.reshape(b, h * k, dim)
        logits = torch.bmm(q_tokens, cast(tokens, q_tokens.dtype).view(b, dim, -1))  # (B, h*K, M*H*W)
        attn = masked_softmax(logits.view(b, h * k, m, x, y), missing, dim=2)
        # class average on the weights, before the values: (B, h, M, H, W)
        attn = attn.view(b, h, k, m, x, y)
        if class_weights is None:
            attn = attn.mean(dim=2)
        else:
            attn = (attn * cast(class_weights, attn.dtype).view(b, 1, k, 1, x, y)).sum(dim=2)
        return self.to_out(project_values(mix_tokens(attn, tokens), w_v, b_v, h))


class RobustnessPerceptron(nn.Module):
    """RP: the semantic reference queries the modality tokens; its weights say how much each modality counts.

    The weights (head-averaged) are the robustness maps: a per-pixel distribution over available
    modalities, learned only through the segmentation loss. Evaluated like SP without per-token keys or
    values: the key projection is folded into the per-pixel query (one grouped 1x1 conv with W_k^T), the
    value projection applied once to the attention-weighted token sum.
    """

    def __init__(self, *, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (embed_dim // num_heads) ** -0.5
        self.to_q = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.to_kv = nn.Conv2d(embed_dim, 2 * embed_dim, kernel_size=1)
        self.to_out = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(
        self, query: Tensor, tokens: Tensor, missing: Tensor, *, return_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        # query (B, D, H, W), tokens (B, D, M, H, W), missing (B, 1, M, 1, 1)
        # -> fused (B, D, H, W), robustness (B, M, H, W) or None
        b, dim, _, x, y = tokens.shape
        h = self.num_heads
        w_k, w_v, b_v = split_kv(self.to_kv, h)
        # q_tokens[b, h, c] = sum_d W_k[h, d, c] q[b, h, d]: W_k^T per head as a grouped 1x1 conv
        w_kt = (w_k * self.scale).transpose(1, 2).reshape(h * dim, dim // h, 1, 1)
        q_tokens = F.conv2d(self.to_q(query), w_kt, groups=h)  # (B, h*D, H, W)
        if h == 1:
            logits = (q_tokens.view(b, dim, 1, x, y) * tokens).sum(dim=1, keepdim=True)  # (B, 1, M, H, W)
        else:
            logits = torch.einsum("bhcxy,bcmxy->bhmxy", q_tokens.view(b, h, dim, x, y), tokens)
        attn = masked_softmax(logits, missing, dim=2)  # (B, h, M, H, W)
        fused = self.to_out(project_values(mix_tokens(attn, tokens), w_v, b_v, h))
        robustness = attn.mean(dim=1) if return_weights else None
        return fused, robustness


class SemanticGuidedFusion(Fusion):
    """SGF: class prototypes guide a per-pixel, mask-aware attention fusion of the available modalities.

    Args:
        in_channels: channels C of this encoder scale.
        num_modalities: M, one projector each.
        num_classes: K, one prototype / class query each.
        embed_dim: token dim D (``None``: min(C, 512)); also the output channels.
        num_heads: attention heads of SP and RP; must divide ``embed_dim``.
        class_average: how SP averages its K class outputs, ``"uniform"`` or ``"weighted"`` (per-pixel
            class posteriors averaged over the available modalities).
        kernel_sizes: depthwise kernels of the projectors.
        norm_groups: GroupNorm groups of the projectors (reduced to gcd with C).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_modalities: int,
        num_classes: int,
        embed_dim: int | None = None,
        num_heads: int = 1,
        class_average: ClassAverage = "uniform",
        kernel_sizes: tuple[int, ...] = (11, 7, 3),
        norm_groups: int = 8,
    ) -> None:
        super().__init__(in_channels=in_channels, num_modalities=num_modalities, num_classes=num_classes)
        key = "model.fusion_options.sgf"
        if embed_dim is None:
            embed_dim = min(in_channels, DEFAULT_MAX_EMBED_DIM)
        check_count(f"{key}.embed_dim", embed_dim, " (null: each scale's encoder channels, capped at 512)")
        check_count(f"{key}.num_heads", num_heads, f" (embed_dim={embed_dim} must be divisible by num_heads)")
        if embed_dim % num_heads != 0:  # each head attends over embed_dim / num_heads channels
            raise ValueError(
                f"SGF: embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                f"(set {key}.num_heads to a divisor of {embed_dim})"
            )
        sizes = tuple(kernel_sizes) if isinstance(kernel_sizes, Sequence) and not isinstance(kernel_sizes, str) else ()
        if not sizes or any(type(k) is not int or k < 1 or k % 2 == 0 for k in sizes):  # odd: "same" padding
            raise ValueError(
                f"{key}.kernel_sizes={kernel_sizes!r} must be a list of odd whole numbers >= 1, e.g. [11, 7, 3]"
            )
        check_count(f"{key}.norm_groups", norm_groups)
        if class_average not in ("uniform", "weighted"):
            raise ValueError(f"SGF: class_average must be 'uniform' or 'weighted', got {class_average!r}")
        self.embed_dim = embed_dim
        self.out_channels = embed_dim
        self.num_heads = num_heads
        self.class_average = class_average
        self.projectors = ModalityProjectors(
            num_modalities=num_modalities,
            in_channels=in_channels,
            embed_dim=embed_dim,
            kernel_sizes=sizes,
            norm_groups=norm_groups,
        )
        self.semantic_filter = SemanticFilter(embed_dim=embed_dim, num_classes=num_classes)
        self.prototypes = SemanticPrototypes()
        self.spatial = SpatialPerceptron(embed_dim=embed_dim, num_heads=num_heads)
        self.robustness = RobustnessPerceptron(embed_dim=embed_dim, num_heads=num_heads)

    def prepare(self, feats: Tensor, available: Tensor) -> Tensor:
        """Modality tokens (B, D, M, H, W); a missing slot is projected from zeros (finite, never used)."""
        return self.projectors(feats, available, channels_last=self.channels_last)

    def class_weights(self, class_maps: Tensor, available: Tensor, missing: Tensor) -> Tensor | None:
        """Per-pixel weights of the K class queries in SP, summing to 1 over K: (B, K, H, W), or None for the
        uniform 1/K (SP then takes a plain mean over classes). ``missing``: (B, 1, M, 1, 1)."""
        if self.class_average == "uniform":
            return None
        posteriors = class_maps.softmax(dim=1, dtype=softmax_dtype(class_maps.dtype))  # (B, K, M, H, W)
        posteriors = posteriors.masked_fill(missing, 0)
        count = available.sum(dim=1).to(posteriors.dtype).view(-1, 1, 1, 1)  # available modalities
        return posteriors.sum(dim=2) / count

    def fuse(self, tokens: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        missing = ~available.view(available.shape[0], 1, available.shape[1], 1, 1)  # broadcasts on (B, *, M, H, W)
        class_maps = self.semantic_filter(tokens)  # (B, K, M, H, W)
        prototypes = self.prototypes(tokens, class_maps, missing)  # (B, K, D)
        f_se = self.spatial(prototypes, tokens, missing, self.class_weights(class_maps, available, missing))
        fused, robustness = self.robustness(f_se, tokens, missing, return_weights=return_robustness)
        return FusionOutput(fused=fused, robustness=robustness)

    def fuse_single(self, tokens: Tensor, available: Tensor) -> FusionOutput:
        """SGF with exactly one available modality per sample, in closed form (the MAS branch).

        Every masked softmax over modalities (SP's and RP's) then has one finite entry: its weights are exactly
        one-hot and its logits get exactly zero gradient, so the class maps, the prototypes, SP and RP's query
        and keys change neither the output nor any gradient. What remains is RP's value and output projection
        of that modality's token: the numbers and gradients of :meth:`fuse`, for two 1x1 convs.
        """
        b, d, _, h, w = tokens.shape
        index = available.to(torch.uint8).argmax(dim=1)  # the available modality, found on the device
        token = tokens.gather(2, index.view(b, 1, 1, 1, 1).expand(b, d, 1, h, w)).squeeze(2)  # (B, D, H, W)
        # with one-hot weights every head mixes the same token: the grouped value projection is a plain 1x1
        _, w_v, b_v = split_kv(self.robustness.to_kv, self.num_heads)
        return FusionOutput(fused=self.robustness.to_out(F.conv2d(token, w_v, b_v)))
