"""The incomplete-modality segmentor: shared encoder -> per-scale fusion -> SegFormer head."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sgma.checks import check_flag
from sgma.modalities import Modality
from sgma.models import build_fusion
from sgma.models.encoder import MultiModalEncoder, packing_index
from sgma.models.fusion import check_inputs
from sgma.models.head import SegFormerHead

# model.compile -> when the stages run compiled: never, always, or in training mode only (evaluation eager)
COMPILE_MODES = {False: None, True: "all", "train": "train"}


@dataclass
class SegmentorOutput:
    logits: Tensor  # (B, K, H, W)
    robustness: list[Tensor] | None = None  # per scale (B, M, H_i, W_i); only when requested and supported


class MultiModalSegmentor(nn.Module):
    """Modalities and classes come from the dataset at the call site; everything else from ``model``
    and ``backbone`` configs.

    The forward pass is split so a training branch can re-fuse the encoder's work under another availability
    mask: :meth:`features` (encode + each fusion's per-modality :meth:`~sgma.models.fusion.Fusion.prepare`)
    and :meth:`fuse_decode` (fusion + head). Neither reads tensor values on the host when the encoder's
    packing index is given (see :func:`sgma.models.encoder.packing_index`).

    ``compile=True`` wraps both stages in ``torch.compile`` (keyword arguments from ``compile_options``, e.g.
    ``{backend: aot_eager}`` or ``{mode: max-autotune}``); ``compile="train"`` only while the module is in
    training mode, so evaluation runs eager and compiles nothing (each mode, packed size and batch size is a
    graph of its own; evaluation is a small share of a run). Parameters and state-dict keys stay those of the
    eager model. ``pack_multiple=N`` pads the packed encoder batch to a multiple of N in eager mode too (see
    :meth:`plan_encoding`): the encoder then meets at most ``ceil(B*M/N)`` batch shapes, which bounds per-shape
    set-up on a GPU (``trainer.benchmark=true`` autotuning, cuDNN execution plans) at the cost of re-encoding up to
    N-1 slots per batch. ``channels_last=True`` stores the encoder's and the head's conv weights channels-last,
    which suits tensor cores under bf16 on GPUs, and runs the fusions' convolutions channels-last (SGF's depthwise
    projectors then run in cuDNN instead of PyTorch's generic depthwise kernels).
    """

    def __init__(
        self,
        *,
        modalities: Sequence[Modality],
        num_classes: int,
        backbone: str,
        pretrained: bool | str | Path = False,
        fusion: str = "mean",
        fusion_options: Mapping | None = None,
        shared_encoder: bool = True,
        input_adapter: str = "replicate",
        decoder_channels: int = 256,
        dropout: float = 0.1,
        compile: bool | str = False,
        compile_options: Mapping | None = None,
        channels_last: bool = False,
        pack_multiple: int | None = None,
    ) -> None:
        super().__init__()
        # checked before the encoder is built (a download, or seconds of set-up)
        shared_encoder = check_flag("model.shared_encoder", shared_encoder)
        self.channels_last = check_flag("model.channels_last", channels_last)
        if not (isinstance(compile, bool) or compile == "train"):  # 1 or 0 would pass as true or false
            raise ValueError(f"model.compile must be false, true or train, got {compile!r}")
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.encoder = MultiModalEncoder(
            name=backbone,
            modalities=self.modalities,
            pretrained=pretrained,
            shared=shared_encoder,
            input_adapter=input_adapter,
        )
        self.fusion = build_fusion(
            fusion,
            in_channels=self.encoder.out_channels,
            num_modalities=len(self.modalities),
            num_classes=num_classes,
            **dict(fusion_options or {}),
        )
        self.head = SegFormerHead(
            in_channels=[f.out_channels for f in self.fusion],
            num_classes=num_classes,
            channels=decoder_channels,
            dropout=dropout,
        )
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)
            for fusion in self.fusion:
                fusion.channels_last = True
        self.compile_mode = COMPILE_MODES[compile]
        if pack_multiple is not None and (type(pack_multiple) is not int or pack_multiple < 1):
            raise ValueError(
                f"model.pack_multiple must be null or a positive integer, got {pack_multiple!r} "
                "(null pads only when compiled, to the batch size; e.g. model.pack_multiple=8)"
            )
        self.pack_multiple = pack_multiple
        self._compiled_stages: dict[str, Callable] = {}
        if self.compile_mode:  # the compiled stages trace the methods themselves: parameters stay the module's own
            # Static shapes: the packed batch takes at most M sizes (see plan_encoding), each compiled once;
            # a dynamic packed dimension recompiles into a graph that inductor (torch 2.11-2.13) fails on.
            options = {"dynamic": False, **dict(compile_options or {})}
            # backends that run the traced graph op by op keep bilinear resizing as torch's kernels
            self.head.opaque_resize = options.get("backend", "inductor") != "inductor"
            # train/eval x M packed sizes x a few batch sizes per stage: more than dynamo's default of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled_stages = {
                "features": torch.compile(self.features, **options),
                "fuse_decode": torch.compile(self.fuse_decode, **options),
            }

    @property
    def compiled(self) -> bool:
        """Whether the stages run compiled now (``compile="train"``: in training mode only)."""
        return self.compile_mode == "all" or (self.compile_mode == "train" and self.training)

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        available: Tensor,
        *,
        return_robustness: bool = False,
        encode_index: Tensor | None = None,
    ) -> SegmentorOutput:
        out_size = tuple(inputs[self.encoder.names[0]].shape[-2:])
        if encode_index is None and self.encoder.shared:
            encode_index = self.plan_encoding(available)
        prepared = self.features(inputs, available, encode_index)
        return self.fuse_decode(prepared, available, out_size, return_robustness=return_robustness)

    def plan_encoding(self, available: Tensor) -> Tensor:
        """The shared encoder's packing plan for ``available`` (:func:`~sgma.models.encoder.packing_index`),
        padded to a multiple of ``pack_multiple`` if set, else of the batch size when the stages run compiled. Reads
        ``available`` on the host: call it where the availability is on the CPU (the training module does so before
        the batch moves to the device)."""
        multiple = self.pack_multiple or (available.shape[0] if self.compiled else 1)
        return packing_index(available, multiple=multiple)

    def features(
        self, inputs: Mapping[str, Tensor], available: Tensor, encode_index: Tensor | None = None
    ) -> list[Tensor]:
        """Encoder features of every scale, prepared for fusion (e.g. SGF's modality tokens)."""
        if not torch.compiler.is_compiling() and self.compiled:  # the compiled stage traces this very method
            return self._compiled_stages["features"](inputs, available, encode_index)
        return self.prepare(self.encode(inputs, available, encode_index), available)

    def encode(
        self, inputs: Mapping[str, Tensor], available: Tensor, encode_index: Tensor | None = None
    ) -> list[Tensor]:
        if self.channels_last:
            inputs = {k: v.contiguous(memory_format=torch.channels_last) for k, v in inputs.items()}
        return self.encoder(inputs, available, encode_index)

    def prepare(self, feats: Sequence[Tensor], available: Tensor) -> list[Tensor]:
        out = []
        for fusion, f in zip(self.fusion, feats, strict=True):
            check_inputs(f, available, num_modalities=fusion.num_modalities, channels=fusion.in_channels)
            out.append(fusion.prepare(f, available))
        return out

    def fuse_decode(
        self,
        prepared: Sequence[Tensor],
        available: Tensor,
        out_size: tuple[int, int],
        *,
        return_robustness: bool = False,
        single: bool = False,
    ) -> SegmentorOutput:
        """Fuse prepared features under ``available`` (every sample needs one available modality; not checked
        here, as that would wait for the device) and decode. ``single=True``: ``available`` holds exactly one
        modality per sample (the MAS branch), which fusions may fuse in an exact closed form
        (:meth:`~sgma.models.fusion.Fusion.fuse_single`; no robustness maps)."""
        if not torch.compiler.is_compiling() and self.compiled:
            stage = self._compiled_stages["fuse_decode"]
            return stage(prepared, available, out_size, return_robustness=return_robustness, single=single)
        fused, robustness = [], []
        for fusion, p in zip(self.fusion, prepared, strict=True):
            if single:
                out = fusion.fuse_single(p, available)
            else:
                out = fusion.fuse(p, available, return_robustness=return_robustness)
            fused.append(out.fused)
            robustness.append(out.robustness)
        logits = self.head(fused, out_size=out_size)
        has_maps = return_robustness and all(r is not None for r in robustness)
        return SegmentorOutput(logits=logits, robustness=robustness if has_maps else None)
