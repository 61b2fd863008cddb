"""SegFormer all-MLP head over the four fused scales (smp's SegformerDecoder parameters, evaluated reassociated)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from torch import Tensor, nn

from sgma.checks import check_count, is_number


@torch.library.custom_op("sgma::resize_bilinear", mutates_args=())
def _resize_bilinear_op(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize (align_corners=False) as one op that graph tracing keeps whole (see :func:`resize_bilinear`)."""
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


@_resize_bilinear_op.register_fake
def _(x: Tensor, height: int, width: int) -> Tensor:
    # torch's kernel keeps a channels-last input channels-last; the traced strides must match the real ones
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((*x.shape[:2], height, width), dtype=x.dtype, device=x.device, memory_format=fmt)


def _resize_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, height, width = inputs
    ctx.input_size, ctx.output_size = list(x.shape), [height, width]


def _resize_backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
    grad_input = torch.ops.aten.upsample_bilinear2d_backward(grad, ctx.output_size, ctx.input_size, False)
    return grad_input, None, None


_resize_bilinear_op.register_autograd(_resize_backward, setup_context=_resize_setup)


def resize_bilinear(x: Tensor, size: tuple[int, int], *, opaque: bool = False) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``; with ``opaque=True``, while
    ``torch.compile`` traces, as one custom op whose backward is torch's own kernel.

    AOT autograd otherwise decomposes bilinear resizing into index arithmetic: about ten ops forward and an
    ``index_put`` scatter backward. Inductor fuses those into generated kernels, but backends that run the traced
    graph op by op (``cudagraphs``, ``aot_eager``) pay each one; on CPU under ``aot_eager`` they made the mit_b0
    training step at 128 px x 8 2.3x slower than eager. Eager calls never take the custom op.
    """
    if opaque and torch.compiler.is_compiling():
        return _resize_bilinear_op(x, int(size[0]), int(size[1]))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegFormerHead(nn.Module):
    """Per-scale linear embedding, upsampling to stride 4, concat + 1x1 fuse (BN, ReLU), classifier.

    The parameters are smp's ``SegformerDecoder``'s (state-dict keys ``decoder.mlp_stage.<i>.linear.*``,
    ``decoder.fuse_stage.*``), but the forward pass computes the same function in another order. SegFormer
    embeds every scale to ``channels``, upsamples all four to stride 4, concatenates them (4 x channels) and
    mixes them with a 1x1 conv. Every step before the norm is linear and acts per pixel on channels, and a
    bilinear upsampling acts per channel on space (its weights sum to 1, so it keeps constants), so they
    commute: ``fuse(cat_i(up(L_i x_i))) = sum_i up(W_i L_i x_i + W_i b_i)``, with W_i the fuse weight's
    block for scale i. Each scale is projected once, at its own resolution, by the product W_i L_i (a
    channels x C_i matrix, formed per call), and the upsampled maps are summed. That drops the
    (B, 4 x channels, H/4, W/4) concatenation and its 4 x channels -> channels conv at stride 4, which was
    about a quarter of an SGMA training step on CPU (it runs twice there, once more for the MAS branch).
    ``tests/test_models.py`` checks outputs and gradients against smp's own forward.
    """

    def __init__(
        self, *, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        assert len(in_channels) == 4, f"SegFormer head needs 4 scales, got {list(in_channels)}"
        self.channels = check_count("model.decoder_channels", channels, " (the SegFormer head's width, e.g. 256)")
        if not (is_number(dropout) and 0 <= dropout < 1):
            raise ValueError(f"model.dropout={dropout!r} must be in [0, 1) (the share of decoder channels dropped)")
        self.decoder = SegformerDecoder(
            encoder_channels=[0, 0, *in_channels], encoder_depth=5, segmentation_channels=channels
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    # set by the segmentor when it compiles with a backend other than inductor (see resize_bilinear)
    opaque_resize = False

    def forward(self, feats: Sequence[Tensor], *, out_size: tuple[int, int]) -> Tensor:
        logits = self.classifier(self.dropout(self.decode(feats)))
        return resize_bilinear(logits, out_size, opaque=self.opaque_resize)

    def decode(self, feats: Sequence[Tensor]) -> Tensor:
        """The decoder's (B, channels, H/4, W/4) map from the four scales (stride 4 first)."""
        conv, norm, act = self.decoder.fuse_stage
        # smp concatenates the deepest scale first: mlp_stage[i] embeds feats[-1 - i], fuse block i mixes it
        blocks = conv.weight.flatten(1).split(self.channels, dim=1)
        target = feats[0].shape[-2:]
        total = None
        for mlp, block, x in zip(self.decoder.mlp_stage, blocks, reversed(feats), strict=True):
            if x.device.type == "cpu":  # torch's CPU bilinear kernel is ~10x slower on NCHW than channels-last
                x = x.contiguous(memory_format=torch.channels_last)
            weight = block @ mlp.linear.weight  # (channels, C_i)
            y = F.conv2d(x, weight[:, :, None, None], block @ mlp.linear.bias)
            if y.shape[-2:] != target:  # smp's same-size bilinear resize of stride 4 is the identity
                y = resize_bilinear(y, target, opaque=self.opaque_resize)
            total = y if total is None else total + y
        if conv.bias is not None:  # smp's fuse conv has none (a norm follows); kept for use_norm=False
            total = total + conv.bias.view(1, -1, 1, 1)
        return act(norm(total))
