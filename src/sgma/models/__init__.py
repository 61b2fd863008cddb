"""Encoder, fusion, head and the segmentor that assembles them."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

from torch import nn

from sgma.models.fusion import ConcatFusion, Fusion, MeanFusion
from sgma.models.sgf import SemanticGuidedFusion

log = logging.getLogger(__name__)

# model.fusion=<name>: every fusion implements the per-scale interface of sgma.models.fusion.Fusion
FUSIONS: dict[str, type[Fusion]] = {
    "mean": MeanFusion,
    "concat": ConcatFusion,
    "sgf": SemanticGuidedFusion,
}

# constructor arguments that build_fusion fills itself (from the encoder and the dataset)
_SIZES = ("in_channels", "num_modalities", "num_classes")


def fusion_option_names(name: str) -> list[str] | None:
    """The keyword options fusion ``name`` accepts in ``model.fusion_options.<name>`` (None: any)."""
    params = inspect.signature(FUSIONS[name].__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name not in ("self", *_SIZES)]


def _per_fusion(options: Mapping, active: str) -> dict[str, dict]:
    """``model.fusion_options`` as {fusion name: its options}, every key checked against its constructor."""
    if options and not set(options) & set(FUSIONS) and not any(isinstance(v, Mapping) for v in options.values()):
        # checkpoints written before options were keyed by fusion store the active fusion's options flat
        log.warning(
            "model.fusion_options has the old flat layout %s; read as model.fusion_options.%s "
            "(options are keyed by fusion name now)",
            dict(options),
            active,
        )
        options = {active: options}
    per_fusion = {}
    for fusion, opts in options.items():
        if fusion not in FUSIONS:
            raise ValueError(
                f"model.fusion_options.{fusion}: not a fusion; options are keyed by fusion name "
                f"({', '.join(FUSIONS)}), e.g. model.fusion_options.sgf.num_heads=2"
            )
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise ValueError(
                f"model.fusion_options.{fusion}={opts!r}: expected a mapping of {fusion}'s options, "
                f"e.g. model.fusion_options.sgf.num_heads=2"
            )
        accepted = fusion_option_names(fusion)
        unknown = [k for k in opts if accepted is not None and k not in accepted]
        if unknown:
            choices = ", ".join(accepted) if accepted else "none"
            raise ValueError(
                f"model.fusion_options.{fusion}.{unknown[0]}: fusion {fusion!r} has no such option "
                f"(its options: {choices})"
            )
        per_fusion[fusion] = dict(opts)
    return per_fusion


def build_fusion(
    name: str, *, in_channels: list[int], num_modalities: int, num_classes: int, **options: Mapping | None
) -> nn.ModuleList:
    """One fusion module per encoder scale.

    ``options`` is ``model.fusion_options``: one mapping per fusion name (``sgf={"num_heads": 2}``). Only the
    options of fusion ``name`` reach its constructor, so a preset's SGF options never leak into
    ``model.fusion=concat``; every listed option is checked against its fusion's constructor.
    """
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {', '.join(FUSIONS)} (model.fusion=...)")
    own = _per_fusion(options, name).get(name, {})
    cls = FUSIONS[name]
    return nn.ModuleList(
        cls(in_channels=c, num_modalities=num_modalities, num_classes=num_classes, **own) for c in in_channels
    )
