"""Every option of every config group composes with real Hydra and instantiates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from conftest import bind_to, compose_config
from sgma.config import CONFIG_DIR, register_configs
from sgma.data.fake import (
    make_fake_deliver,
    make_fake_dfc2023,
    make_fake_folder,
    make_fake_potsdam,
    make_fake_vaihingen,
)
from sgma.models.fusion import ConcatFusion
from sgma.tasks import build_datamodule, build_module, train
from sgma.utils import instantiate, instantiate_dict

# real-layout fake data for the datasets that read files
FAKE_DATA = {
    "potsdam": make_fake_potsdam,
    "vaihingen": make_fake_vaihingen,
    "dfc2023": make_fake_dfc2023,
    "folder": make_fake_folder,
    "deliver": make_fake_deliver,
}

GROUPS = [
    "dataset",
    "backbone",
    "model",
    "missing",
    "augment",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "debug",
    "experiment",
]


def options(group: str) -> list[str]:
    files = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    register_configs()
    stored = ConfigStore.instance().repo.get(group, {})
    return files + sorted(name.removesuffix(".yaml") for name in stored)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} is empty"
    assert "rgb+dsm" in options("missing") and "uniform" in options("missing")


def _build(cfg, tmp_path: Path):
    cfg = bind_to(cfg, tmp_path)
    with open_dict(cfg):
        # instantiation only: no downloads and no GPU in tests; composition keeps the option's values
        cfg.backbone.pretrained = False
        cfg.trainer.accelerator = "cpu"
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        trainer_cfg.devices = 1
        trainer_cfg.pop("strategy", None)
        trainer_cfg.pop("sync_batchnorm", None)
    trainer = instantiate(trainer_cfg, logger=False)
    return dm, module, trainer, instantiate_dict(cfg.get("callbacks")), instantiate_dict(cfg.get("logger"))


def _fits_default_data(group: str, option: str) -> bool:
    """Pattern options naming modalities the default synthetic data lacks are tested on their own datasets."""
    if group != "missing" or (CONFIG_DIR / "missing" / f"{option}.yaml").is_file():
        return True
    return set(option.split("+")) <= {"rgb", "nir", "dsm"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g) if _fits_default_data(g, o)])
def test_option_composes_and_instantiates(group, option, tmp_path):
    extra = []
    if group == "dataset" and option in FAKE_DATA:
        extra = [f"dataset.builder.root={FAKE_DATA[option](tmp_path / option)}"]
    if group == "experiment":  # the per-dataset recipes read their dataset's (fake) release
        name = compose_config("train", [f"experiment={option}"]).dataset.name
        if name in FAKE_DATA:
            extra = [f"dataset.builder.root={FAKE_DATA[name](tmp_path / name)}"]
    if group == "missing" and option == "pattern":
        extra = ["missing.pattern=dsm+rgb"]  # the generic form needs its pattern
    cfg = compose_config("train", ["debug=tiny", f"{group}={option}", *extra])
    assert cfg.hydra.runtime.choices[group] == option
    dm, module, trainer, callbacks, loggers = _build(cfg, tmp_path)
    assert module.net.num_classes == dm.num_classes
    if group == "dataset":  # what the augmentation jitters: the optical images only, never heights or SAR
        kinds = {m.name: m.kind for m in dm.modalities}
        expected = {"rgb": "optical", "nir": "optical", "irrg": "optical", "dsm": "elevation", "sar": "sar"}
        assert {n: k for n, k in kinds.items() if n in expected} == {n: expected[n] for n in kinds if n in expected}
    assert trainer.max_epochs >= 1 and isinstance(callbacks, list) and isinstance(loggers, list)


def test_sar_patterns_need_the_sar_modality(tmp_path):
    cfg = compose_config("train", ["debug=tiny", "missing=rgb+sar"])
    with pytest.raises(ValueError, match=r"unknown modality 'sar'.*rgb, nir, dsm"):
        _build(cfg, tmp_path)
    cfg = compose_config("train", ["debug=tiny", "missing=rgb+sar", "dataset.builder.modalities=[rgb,nir,dsm,sar]"])
    dm, *_ = _build(cfg, tmp_path)
    assert len(dm.patterns) == 15


def test_backbone_variants_resolve():
    assert compose_config("train", ["backbone=segformer", "backbone.variant=b2"]).backbone.name == "mit_b2"
    assert compose_config("train", ["backbone=pvt_v2"]).backbone.name == "tu-pvt_v2_b2"
    assert compose_config("train", ["backbone=resnet", "backbone.variant=18"]).backbone.name == "resnet18"


def test_paper_recipe_values():
    cfg = compose_config("train", ["experiment=paper"])
    assert cfg.backbone.name == "tu-pvt_v2_b2" and cfg.backbone.pretrained is True
    assert cfg.optimizer.lr == 6e-5 and cfg.optimizer.weight_decay == 0.01 and cfg.optimizer.eps == 1e-8
    assert cfg.trainer.max_epochs == 200 and cfg.scheduler.warmup_fraction == 0.05
    assert cfg.scheduler.start_factor == 0.1 and cfg.scheduler.power == 0.9


@pytest.mark.parametrize(
    "recipe,dataset,size",
    [("paper_potsdam", "potsdam", 512), ("paper_dfc2023", "dfc2023", 512), ("paper_deliver", "deliver", 1024)],
)
def test_per_dataset_recipes_extend_the_paper_recipe(recipe, dataset, size):
    paper = compose_config("train", ["experiment=paper"])
    cfg = compose_config("train", [f"experiment={recipe}"])
    assert cfg.dataset.name == dataset and cfg.dataset.size == size
    for key in ("backbone", "optimizer", "scheduler", "augment"):
        assert cfg[key] == paper[key], key
    assert cfg.augment.scale == [0.5, 2.0] and cfg.augment.hflip == 0.5 and cfg.augment.jitter.p == 0.2
    assert cfg.trainer.max_epochs == 200 and cfg.trainer.devices == 4 and cfg.data.batch_size == 2
    assert cfg.trainer.strategy.startswith("ddp") and cfg.dataset.builder.stride is None
    if dataset == "deliver":  # scored on whole frames resized to 1024, as CMNeXt
        assert cfg.dataset.builder.resize == 1024


def test_unknown_pattern_option_lists_choices():
    with pytest.raises(ConfigCompositionException, match=r"rgb\+dsm"):
        compose_config("train", ["missing=rgb+radar"])


def test_unknown_backbone_is_a_clear_error(tmp_path):
    cfg = compose_config("train", ["debug=tiny", "backbone.name=mit_b42"])
    with pytest.raises(ValueError, match="unknown backbone 'mit_b42'"):
        _build(cfg, tmp_path)


def test_image_size_not_multiple_of_32(tmp_path):
    cfg = compose_config("train", ["debug=tiny", "dataset.builder.image_size=100"])
    with pytest.raises(ValueError, match=r"multiple of 32.*96"):
        _build(cfg, tmp_path)


@pytest.mark.parametrize("pattern", ["irrg", "dsm", "irrg+dsm"])
def test_vaihingen_patterns(pattern, tmp_path):
    root = make_fake_vaihingen(tmp_path / "vaihingen")
    cfg = compose_config(
        "train", ["debug=tiny", "dataset=vaihingen", f"dataset.builder.root={root}", f"missing={pattern}"]
    )
    dm, *_ = _build(cfg, tmp_path)
    assert [m.name for m in dm.modalities] == ["irrg", "dsm"] and len(dm.patterns) == 3


@pytest.mark.parametrize("model", ["sgma", "sgf_only"])
def test_other_fusion_on_an_sgf_preset(model, tmp_path):
    """`model.fusion=concat` on a preset with SGF options (it used to fail: TypeError on embed_dim)."""
    cfg = compose_config("train", ["debug=tiny", f"model={model}", "model.fusion=concat"])
    _, module, *_ = _build(cfg, tmp_path)
    assert all(isinstance(f, ConcatFusion) for f in module.net.fusion)


def test_fusion_options_by_fusion_name(tmp_path):
    cfg = compose_config(
        "train", ["debug=tiny", "model=baseline", "model.fusion=sgf", "model.fusion_options.sgf.num_heads=2"]
    )
    _, module, *_ = _build(cfg, tmp_path)
    assert [f.num_heads for f in module.net.fusion] == [2] * 4
    cfg = compose_config("train", ["debug=tiny", "model=sgma", "+model.fusion_options.sgf.heads=2"])
    with pytest.raises(ValueError, match=r"model\.fusion_options\.sgf\.heads: .*no such option"):
        _build(cfg, tmp_path)


def test_debug_fdr_runs(tmp_path):
    """debug=fdr has no logger, so it drops the lr monitor (which refuses a trainer without a logger)."""
    cfg = bind_to(compose_config("train", ["debug=fdr", "dataset.size=64", "model.decoder_channels=32"]), tmp_path)
    metrics, objects = train(cfg)
    assert objects["trainer"].fast_dev_run and "test/avg/miou" in metrics
    assert cfg.logger is None and cfg.callbacks.lr_monitor is None


def test_auto_loader_settings_follow_the_device(monkeypatch):
    """data.num_workers=auto: none on CPU, else CPU cores per device process - 1 (at most 8); data.pin_memory=auto:
    on CUDA only. Explicit values are kept, wrong ones refused with the fix."""
    from sgma.builders import loader_settings

    monkeypatch.setattr("sgma.builders.os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr("sgma.builders.torch.cuda.device_count", lambda: 2)

    def settings(*overrides: str) -> tuple[int, bool]:
        cfg = compose_config("train", list(overrides))
        return loader_settings(cfg.data, cfg.trainer)

    assert settings("trainer=cpu") == (0, False)
    if not torch.cuda.is_available():  # accelerator=auto, the default, on a machine without a GPU
        assert settings() == (0, False)
    assert settings("trainer=ddp_cpu") == (0, False)
    assert settings("trainer=gpu") == (8, True)  # 16 cores, one GPU: capped at 8
    assert settings("trainer=ddp") == (3, True)  # 4 GPU processes share 16 cores
    assert settings("trainer=gpu", "trainer.devices=[0,1,2,3,4,5,6,7]") == (1, True)
    assert settings("trainer=gpu", "trainer.devices=auto") == (7, True)  # 2 visible GPUs
    assert (
        settings("trainer=gpu", "trainer.devices='0,1'") == settings("trainer=gpu", "trainer.devices='2'") == (7, True)
    )
    assert settings("trainer=gpu", "data.num_workers=2", "data.pin_memory=false") == (2, False)
    for bad, message in (
        ("data.num_workers=-1", "data.num_workers=-1: use auto or a whole number >= 0, e.g."),
        ("data.num_workers=many", "data.num_workers='many': use auto"),
        ("data.pin_memory=maybe", "data.pin_memory='maybe': use auto, true or false"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            settings("trainer=gpu", bad)
