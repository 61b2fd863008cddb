"""The modality encoder: one smp encoder (shared by default) run on each available modality.

Every backbone is built through :func:`segmentation_models_pytorch.encoders.get_encoder`, so MiT
(``mit_b0``..``mit_b5``), timm's PVT-v2 (``tu-pvt_v2_b0``..``b5``) and ResNets share one code path. We keep
the last four scales (strides 4, 8, 16, 32); MiT and PVT-v2 put an empty 0-channel map at stride 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from segmentation_models_pytorch.encoders import get_encoder, get_encoder_names
from torch import Tensor, nn

from sgma.modalities import Modality

NUM_SCALES = 4
ENCODER_IN_CHANNELS = 3  # pretrained encoders expect 3-channel input
CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.")


def validate_backbone_name(name: str) -> None:
    if name.startswith("tu-"):
        import timm

        if not timm.list_models(name[3:]):
            pvt = ", ".join(f"tu-pvt_v2_b{i}" for i in range(6))
            raise ValueError(f"unknown timm backbone {name!r} (timm has no model {name[3:]!r}); e.g. {pvt}")
        return
    known = get_encoder_names()
    if name not in known:
        families = sorted({n for n in known if n.startswith(("mit_b", "resnet"))})
        raise ValueError(
            f"unknown backbone {name!r}; smp encoders include {', '.join(families)}, and any timm model as "
            f"'tu-<name>' (e.g. tu-pvt_v2_b2). Pick one with backbone=segformer|pvt_v2|resnet and "
            f"backbone.variant=..."
        )


def build_encoder(name: str, *, pretrained: bool | str | Path = False) -> nn.Module:
    """Build an smp encoder. ``pretrained``: False (random init), True (download ImageNet weights) or a
    path to a local weights file (a state dict of this encoder, optionally with an ``encoder.`` prefix
    as in a full smp model checkpoint)."""
    validate_backbone_name(name)
    if not isinstance(pretrained, bool | str | Path):  # 1 or 0 would silently mean random init
        raise ValueError(f"backbone.pretrained={pretrained!r} must be true, false or the path of a weights file")
    # tu- encoders take a bool, smp's own encoders the name of a weight set
    weights = (name.startswith("tu-") or "imagenet") if pretrained is True else None
    try:
        encoder = get_encoder(name, in_channels=ENCODER_IN_CHANNELS, depth=5, weights=weights)
    except Exception as err:
        if weights is None:
            raise
        # the download (Hugging Face hub, torch hub) failed: offline, a proxy, or the hub; the library's own error is
        # kept as the cause, the fix that works offline is a local file
        raise RuntimeError(
            f"backbone.pretrained=true could not download the ImageNet weights of {name!r} ({type(err).__name__}: "
            f"{err}). Without internet access, download them on another machine and give the file: "
            f"backbone.pretrained=/path/to/{name}.pth (or backbone.pretrained=false for random init)"
        ) from err
    if isinstance(pretrained, str | Path) and not isinstance(pretrained, bool):
        load_encoder_weights(encoder, Path(pretrained), name=name)
    return encoder


def load_encoder_weights(encoder: nn.Module, path: Path, *, name: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone.pretrained={str(path)!r} is not a file; give a weights file for {name!r} "
            f"(a .pth/.pt state dict or .safetensors), true to download, or false for random init"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"could not read backbone weights {str(path)!r}: {err}") from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise RuntimeError(f"backbone weights {str(path)!r} hold a {type(state).__name__}, not a state dict")
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    # ImageNet checkpoints carry a classification head the encoder has no slot for
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    own = encoder.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    if mismatched:  # another variant of the family (e.g. mit_b1 weights for mit_b0): torch would dump every tensor
        raise RuntimeError(
            f"backbone weights {str(path)!r} do not fit {name!r}: {len(mismatched)} tensors have other shapes "
            f"(e.g. {'; '.join(mismatched[:3])}); is it a {name} checkpoint, or one of another variant?"
        )
    # nn.Module's own loader: smp encoders override load_state_dict with differing signatures
    result = nn.Module.load_state_dict(encoder, state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"backbone weights {str(path)!r} do not fit {name!r}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}); is it a {name} checkpoint?"
        )


class InputAdapter(nn.Module):
    """Turns a modality's C channels into the encoder's 3.

    ``replicate``: 1-channel -> copied 3 times, 3-channel -> unchanged (keeps pretrained stems meaningful).
    ``conv``: a learned 1x1 conv per modality (any channel count).
    """

    def __init__(self, *, channels: int, mode: str) -> None:
        super().__init__()
        self.channels = channels
        self.mode = mode
        if mode == "conv":
            self.proj = nn.Conv2d(channels, ENCODER_IN_CHANNELS, kernel_size=1)
        elif mode == "replicate":
            if channels not in (1, ENCODER_IN_CHANNELS):
                raise ValueError(
                    f"input_adapter=replicate needs 1 or 3 channels, this modality has {channels}; "
                    f"use model.input_adapter=conv"
                )
        else:
            raise ValueError(f"unknown input_adapter {mode!r}; use 'replicate' or 'conv'")

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "conv":
            return self.proj(x)
        return x.expand(-1, ENCODER_IN_CHANNELS, -1, -1) if self.channels == 1 else x


def packing_index(available: Tensor, multiple: int = 1) -> Tensor:
    """The encoder's plan: a (2, N) index whose row 0 lists the flat positions ``b * M + m`` of the available
    (sample, modality) slots, ascending, to encode, and row 1 where each encoded row goes.

    Its length is data-dependent, so computing it on a GPU waits for the device (``nonzero``). The training
    module computes it on the host, where the batch's availability lives before it is moved to the device,
    and hands it to :meth:`MultiModalEncoder.forward` as ``index``.

    ``multiple`` > 1 pads N up to a multiple of it (the batch size, for ``torch.compile``: at most M packed
    shapes, each compiled once, instead of a new graph for every count of available slots). The padding
    re-encodes available slots (never a missing one, whose input may hold anything) and sends them to the
    scratch row ``B * M``, which the encoder drops. The output is unchanged, except that a BatchNorm encoder
    (``backbone=resnet``) in training mode counts the re-encoded slots twice in its batch statistics.
    """
    check_every_sample_has_one(available)
    slots = available.reshape(-1).nonzero().squeeze(1)
    pad = -len(slots) % int(multiple)
    source = torch.cat([slots, slots.repeat(pad // len(slots) + 1)[:pad]])
    target = torch.cat([slots, slots.new_full((pad,), available.numel())])
    return torch.stack([source, target])


def check_every_sample_has_one(available: Tensor) -> None:
    """An empty pattern has nothing to fuse (0/0 in mean fusion, all -inf softmaxes in SGF): refuse it, naming
    the samples. Host check: the encoder's plan needs the availability on the host anyway."""
    if not bool(available.any(dim=1).all()):
        empty = (~available.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"every sample needs at least one available modality; samples {empty} have none")


class MultiModalEncoder(nn.Module):
    """Encodes each available (sample, modality) pair; returns per-scale features (B, M, C_i, H_i, W_i).

    Missing modalities are never encoded (their slots are zeros): this saves the encoder passes for
    them and keeps BatchNorm statistics free of empty inputs. With ``shared=True`` all available pairs go
    through the single encoder in one batched pass: the inputs are stacked to (B*M, 3, H, W), the available
    rows gathered by ``index`` (see :func:`packing_index`), encoded, and scattered back into zeros. Given the
    index, this reads no tensor values on the host: no device sync, no graph break under ``torch.compile``.
    Per-modality encoders (``shared=False``, an ablation) find each
    modality's rows on the device, which waits for it.
    """

    def __init__(
        self,
        *,
        name: str,
        modalities: Sequence[Modality],
        pretrained: bool | str | Path = False,
        shared: bool = True,
        input_adapter: str = "replicate",
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        # plain strings: the modalities may arrive as OmegaConf nodes (Hydra instantiate), whose attribute
        # access is slow and breaks a torch.compile graph
        self.names = tuple(str(m.name) for m in self.modalities)
        self.shared = shared
        self.adapters = nn.ModuleDict(
            {m.name: InputAdapter(channels=m.channels, mode=input_adapter) for m in self.modalities}
        )
        if shared:
            self.encoder = build_encoder(name, pretrained=pretrained)
            channels = self.encoder.out_channels
        else:
            self.encoders = nn.ModuleDict({m.name: build_encoder(name, pretrained=pretrained) for m in modalities})
            channels = next(iter(self.encoders.values())).out_channels
        self.out_channels: list[int] = list(channels[-NUM_SCALES:])

    def forward(self, inputs: Mapping[str, Tensor], available: Tensor, index: Tensor | None = None) -> list[Tensor]:
        """``index``: :func:`packing_index` of ``available``, computed here (a device sync) when not given."""
        names = self.names
        first = inputs[names[0]]
        b, h, w = first.shape[0], first.shape[-2], first.shape[-1]
        if h % 32 or w % 32:
            raise ValueError(f"input size {h}x{w} is not a multiple of 32 (needed by the 4-scale encoders)")
        if not self.shared:
            return self._forward_per_modality(inputs, available)
        if index is None:
            index = packing_index(available)
        m = len(names)
        source, target = index
        stacked = torch.stack([self.adapters[n](inputs[n]) for n in names], dim=1)  # (B, M, 3, H, W)
        packed = stacked.flatten(0, 1).index_select(0, source)  # (N, 3, H, W)
        out = []
        for f in self._encode(self.encoder, packed):  # padding rows land in the scratch row b * m, dropped
            full = f.new_zeros(b * m + 1, *f.shape[1:]).index_copy(0, target, f)
            out.append(full[: b * m].view(b, m, *f.shape[1:]))
        return out

    def _forward_per_modality(self, inputs: Mapping[str, Tensor], available: Tensor) -> list[Tensor]:
        names = self.names
        b = available.shape[0]
        check_every_sample_has_one(available)  # this path syncs on nonzero anyway
        slots = [available[:, i].nonzero(as_tuple=True)[0] for i in range(len(names))]
        present = [i for i, idx in enumerate(slots) if idx.numel()]
        per_modality = [
            self._encode(self.encoders[names[i]], self.adapters[names[i]](inputs[names[i]][slots[i]])) for i in present
        ]
        out = []
        for s, c in enumerate(self.out_channels):
            ref = per_modality[0][s]
            feats = ref.new_zeros(b, len(names), c, *ref.shape[-2:])
            for j, i in enumerate(present):
                feats[slots[i], i] = per_modality[j][s]
            out.append(feats)
        return out

    @staticmethod
    def _encode(encoder: nn.Module, x: Tensor) -> list[Tensor]:
        return list(encoder(x)[-NUM_SCALES:])
