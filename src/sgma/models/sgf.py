"""SGF (Semantic-Guided Fusion): the per-scale fusion of SGMA, robust to missing modalities.

Pipeline at one scale (see ``docs/METHOD.md``), for features (B, M, C, H, W) and availability (B, M):

1. :class:`ModalityProjector` (one per modality) -> modality tokens x_m (B, M, D, H, W).
2. :class:`SemanticFilter` (shared 1x1 conv) -> class response maps c_m (B, M, K, H, W).
3. :class:`SemanticPrototypes` -> one D-dim prototype per class, pooled over every available modality and
   position (B, K, D).
4. :class:`SpatialPerceptron`: at every pixel the K prototypes attend over that pixel's available modality
   tokens; averaged over classes -> semantic reference f_se (B, D, H, W).
5. :class:`RobustnessPerceptron`: f_se attends over the modality tokens; the output is the fused feature,
   the head-averaged attention weights are the robustness maps r (B, M, H, W).

Missing modalities are excluded everywhere by masking, never by their (zeroed) values: their inputs are
replaced by exact zeros with ``torch.where`` before any arithmetic (so NaN/inf garbage cannot leak), their
tokens are zeroed again after projection, their attention logits are -inf, and every masked softmax is
followed by ``torch.where(mask, w, 0)`` so their weights are exactly 0.

Choices that are ours where the paper is silent:

- **Projector merge and norm**: the three depthwise branches (11x11, 7x7, 3x3) are summed, then
  **GroupNorm** + GELU, then a 1x1 conv to the embedding dim. GroupNorm normalises each sample on its own,
  so the zeroed slot of a missing modality never enters another sample's statistics, train or eval, and
  every projector can still run on the whole batch with static shapes (``torch.compile`` friendly). This
  rules out BatchNorm, whose batch statistics would mix in the missing samples (and is noisy at the
  paper's batch of 2 per GPU). The cost is that projectors also run on missing slots; their output is
  discarded.
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

Efficiency: prototypes are projected once per image (q = W_q P, (B, heads, K, d)) and contracted with the
per-pixel tokens by einsum over (batch, heads, K, M, H, W). Because the class average is linear, the SP
attention weights are averaged over classes *before* they meet the values, so the only K-sized tensor per
pixel is the attention map itself, O(B*heads*K*M*H*W); nothing of size K*D*H*W is ever materialised.
Neither attention computes keys or values for every modality token: the key projection is folded into the
queries (q . (W_k x + b_k) = (W_k^T q) . x + const, and the constant cancels in the softmax over
modalities) and the value projection is applied once to the attention-weighted token sum (the weights sum
to 1). Both rewrites are exact reorderings of linear maps with the same parameters; they cut the 1x1
projections from M+1 to 2 per pixel in each attention, which dominates SGF's training cost on CPU.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sgma.models.fusion import Fusion, FusionOutput, zero_missing

ClassAverage = Literal["uniform", "weighted"]

# embed_dim=None keeps each scale's channels up to this cap: MiT/PVT-v2 (<= 512 channels) are unchanged and
# SGF adds the paper's ~4.8 M parameters on PVT-v2-b2; ResNet-50's 2048-channel stage would otherwise cost
# ~46 M parameters in that one scale's attentions.
DEFAULT_MAX_EMBED_DIM = 512


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half/bf16 to float32, keep float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_softmax(logits: Tensor, mask: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Softmax over ``dim`` restricted to ``mask``; masked entries are exactly 0, even for NaN logits.

    ``mask`` broadcasts against ``logits``; every slice along ``dim`` must hold one True entry at least.
    Computed in float32 at least (bf16 would lose the 1-sum) and returned in that dtype.
    """
    masked = torch.where(mask, at_least_fp32(logits), float("-inf"))
    if isinstance(dim, int):
        weights = masked.softmax(dim=dim)
    else:  # joint softmax over several axes: subtract the max, normalise by the joint sum
        masked = masked - masked.amax(dim=dim, keepdim=True)
        exp = masked.exp()
        weights = exp / exp.sum(dim=dim, keepdim=True)
    return torch.where(mask, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))


class ModalityProjector(nn.Module):
    """MP: multi-scale depthwise context (11x11 + 7x7 + 3x3, summed), GroupNorm + GELU, 1x1 to embed dim.

    Large depthwise kernels give each modality a wide, cheap receptive field before the per-pixel
    attention, which otherwise sees one pixel at a time.
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
        weight, bias = self.merged_kernel(*x.shape[-2:])
        kh, kw = weight.shape[-2:]
        context = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
        return self.proj(self.act(self.norm(context)))

    def merged_kernel(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """The parallel branches as one depthwise kernel (exact: convolution is linear in the kernel).

        One large-kernel conv instead of three halves the cost of the projector; gradients reach each
        branch's parameters exactly as with separate convs. Taps farther than (H-1, W-1) from the centre
        only ever meet zero padding, so the kernel is cropped to (2H-1, 2W-1) on small maps (the
        stride-32 scale of a 64-128 px crop), where an 11x11 kernel is mostly padding.
        """
        k = max(b.kernel_size[0] for b in self.branches)
        weight = sum(F.pad(b.weight, [(k - b.kernel_size[0]) // 2] * 4) for b in self.branches)
        bias = sum(b.bias for b in self.branches)
        kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
        top, left = (k - kh) // 2, (k - kw) // 2
        return weight[..., top : top + kh, left : left + kw], bias


class SemanticFilter(nn.Module):
    """CSF: one 1x1 conv shared by all modalities, so class maps of different modalities are comparable."""

    def __init__(self, *, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, M, D, H, W) -> (B, M, K, H, W)
        b = tokens.shape[0]
        maps = self.classifier(rearrange(tokens, "b m d h w -> (b m) d h w"))
        return rearrange(maps, "(b m) k h w -> b m k h w", b=b)


class SemanticPrototypes(nn.Module):
    """Global class prototypes, pooled jointly over all positions of all available modalities.

    Each class map is turned into one spatial distribution over (M, H, W) by a masked softmax, so a
    prototype is a convex combination of available tokens only (OCRNet-style region pooling).
    """

    def forward(self, tokens: Tensor, class_maps: Tensor, available: Tensor) -> Tensor:
        # tokens (B, M, D, H, W), class_maps (B, M, K, H, W), available (B, M) -> prototypes (B, K, D)
        mask = available[:, :, None, None, None]  # (B, M, 1, 1, 1)
        weights = masked_softmax(class_maps, mask, dim=(1, 3, 4))  # (B, M, K, H, W), sums to 1 per (b, k)
        return torch.einsum("bmkhw,bmdhw->bkd", weights.to(tokens.dtype), tokens)


def split_kv(to_kv: nn.Conv2d, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The key and value projections of a fused 1x1 ``to_kv`` conv, per head: W_k, W_v (h, d, D), b_v (h, d).

    The key bias is not returned: it only adds ``q . b_k`` to every modality's logit at a pixel, a constant
    that the softmax over modalities cancels.
    """
    two_d, d_in = to_kv.weight.shape[:2]
    w = to_kv.weight.view(2, num_heads, two_d // (2 * num_heads), d_in)
    return w[0], w[1], to_kv.bias.view(2, num_heads, -1)[1]


def weighted_tokens(attn: Tensor, tokens: Tensor) -> Tensor:
    """sum_m attn[:, h, m] * tokens[:, m]: (B, h, M, N) x (B, M, D, N) -> (B, h, D, N), a loop over the few M."""
    out = attn[:, :, 0, None] * tokens[:, None, 0]
    for m in range(1, tokens.shape[1]):
        out = out + attn[:, :, m, None] * tokens[:, None, m]
    return out


def project_values(mixed: Tensor, w_v: Tensor, b_v: Tensor) -> Tensor:
    """Per-head value projection of already-mixed tokens: (B, h, D, N) -> (B, h*d, N).

    Exact reassociation: attention weights sum to 1 over modalities, so
    sum_m a_m (W_v x_m + b_v) = W_v (sum_m a_m x_m) + b_v, which projects once instead of once per modality.
    """
    out = torch.einsum("bhcn,hdc->bhdn", mixed, w_v.to(mixed.dtype)) + b_v.to(mixed.dtype)[None, :, :, None]
    return out.flatten(1, 2)


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

    def forward(self, prototypes: Tensor, tokens: Tensor, available: Tensor, class_weights: Tensor) -> Tensor:
        # prototypes (B, K, D), tokens (B, M, D, H, W), available (B, M),
        # class_weights (B, K, H, W) summing to 1 over K -> f_se (B, D, H, W)
        b, m, dim, x, y = tokens.shape
        h = self.num_heads
        w_k, w_v, b_v = split_kv(self.to_kv, h)
        q = rearrange(self.to_q(prototypes), "b k (h d) -> b h k d", h=h)  # once per image, not per pixel
        q_tokens = torch.einsum("bhkd,hdc->bhkc", q, w_k.to(q.dtype)) * self.scale  # keys folded into queries
        flat = tokens.flatten(3)  # (B, M, D, N)
        logits = torch.stack(
            [torch.einsum("bhkc,bcn->bhkn", q_tokens, flat[:, i]) for i in range(m)], dim=3
        )  # (B, h, K, M, N)
        attn = masked_softmax(logits, available[:, None, None, :, None], dim=3)
        # class average on the weights, before the values: (B, h, M, N)
        attn = torch.einsum("bhkmn,bkn->bhmn", attn, class_weights.flatten(2).to(attn.dtype))
        mixed = weighted_tokens(attn.to(tokens.dtype), flat)  # (B, h, D, N)
        out = project_values(mixed, w_v, b_v)  # (B, D, N)
        return self.to_out(out.view(b, dim, x, y))


class RobustnessPerceptron(nn.Module):
    """RP: the semantic reference queries the modality tokens; its weights say how much each modality counts.

    The weights (head-averaged) are the robustness maps: a per-pixel distribution over available
    modalities, learned only through the segmentation loss. Evaluated like SP without per-token keys or
    values: the key projection is folded into the per-pixel query, the value projection applied once to the
    attention-weighted token sum.
    """

    def __init__(self, *, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (embed_dim // num_heads) ** -0.5
        self.to_q = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.to_kv = nn.Conv2d(embed_dim, 2 * embed_dim, kernel_size=1)
        self.to_out = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(
        self, query: Tensor, tokens: Tensor, available: Tensor, *, return_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        # query (B, D, H, W), tokens (B, M, D, H, W), available (B, M)
        # -> fused (B, D, H, W), robustness (B, M, H, W) or None
        b, m, dim, x, y = tokens.shape
        h = self.num_heads
        w_k, w_v, b_v = split_kv(self.to_kv, h)
        q = rearrange(self.to_q(query), "b (h d) x y -> b h d (x y)", h=h)
        q_tokens = torch.einsum("bhdn,hdc->bhcn", q, w_k.to(q.dtype)) * self.scale  # (B, h, D, N)
        flat = tokens.flatten(3)  # (B, M, D, N)
        logits = torch.stack([(q_tokens * flat[:, None, i]).sum(dim=2) for i in range(m)], dim=2)  # (B, h, M, N)
        attn = masked_softmax(logits, available[:, None, :, None], dim=2)
        mixed = weighted_tokens(attn.to(tokens.dtype), flat)  # (B, h, D, N)
        fused = self.to_out(project_values(mixed, w_v, b_v).view(b, dim, x, y))
        robustness = attn.mean(dim=1).view(b, m, x, y) if return_weights else None
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
        embed_dim = min(in_channels, DEFAULT_MAX_EMBED_DIM) if embed_dim is None else embed_dim
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"SGF: embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                f"(set model.fusion_options.num_heads to a divisor of {embed_dim})"
            )
        if class_average not in ("uniform", "weighted"):
            raise ValueError(f"SGF: class_average must be 'uniform' or 'weighted', got {class_average!r}")
        self.embed_dim = embed_dim
        self.out_channels = embed_dim
        self.num_heads = num_heads
        self.class_average = class_average
        self.projectors = nn.ModuleList(
            ModalityProjector(
                in_channels=in_channels,
                embed_dim=embed_dim,
                kernel_sizes=tuple(kernel_sizes),
                norm_groups=norm_groups,
            )
            for _ in range(num_modalities)
        )
        self.semantic_filter = SemanticFilter(embed_dim=embed_dim, num_classes=num_classes)
        self.prototypes = SemanticPrototypes()
        self.spatial = SpatialPerceptron(embed_dim=embed_dim, num_heads=num_heads)
        self.robustness = RobustnessPerceptron(embed_dim=embed_dim, num_heads=num_heads)

    def tokens(self, feats: Tensor, available: Tensor) -> Tensor:
        """Project each modality; missing slots are zero in, zero out: (B, M, C, H, W) -> (B, M, D, H, W)."""
        feats = zero_missing(feats, available)
        tokens = torch.stack([proj(feats[:, i]) for i, proj in enumerate(self.projectors)], dim=1)
        return zero_missing(tokens, available)  # the conv biases made them non-zero

    def class_weights(self, class_maps: Tensor, available: Tensor) -> Tensor:
        """Per-pixel weights of the K class queries in SP, summing to 1 over K: (B, K, H, W)."""
        b, _, k, h, w = class_maps.shape
        if self.class_average == "uniform":
            dtype = torch.promote_types(class_maps.dtype, torch.float32)
            return torch.full((b, k, h, w), 1.0 / k, dtype=dtype, device=class_maps.device)
        posteriors = at_least_fp32(class_maps).softmax(dim=2)  # (B, M, K, H, W)
        posteriors = torch.where(available[:, :, None, None, None], posteriors, torch.zeros_like(posteriors))
        count = available.sum(dim=1).to(posteriors.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        return posteriors.sum(dim=1) / count

    def fuse(self, feats: Tensor, available: Tensor, *, return_robustness: bool) -> FusionOutput:
        tokens = self.tokens(feats, available)  # (B, M, D, H, W)
        class_maps = self.semantic_filter(tokens)  # (B, M, K, H, W)
        prototypes = self.prototypes(tokens, class_maps, available)  # (B, K, D)
        f_se = self.spatial(prototypes, tokens, available, self.class_weights(class_maps, available))
        fused, robustness = self.robustness(f_se, tokens, available, return_weights=return_robustness)
        return FusionOutput(fused=fused, robustness=robustness)
