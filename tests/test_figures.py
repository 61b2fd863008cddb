"""Run-folder plots: figure functions on real data, sample panels from real tiny models, plots/ of train and eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from conftest import bind_to, compose_config
from sgma.builders import build_datamodule, build_module
from sgma.checkpoint import CHECKPOINT_KEY, load_checkpoint
from sgma.data.synthetic import CLASSES, PALETTE
from sgma.figures import (
    DPI,
    confusion_figure,
    curve_group,
    curves_figure,
    panel_figure,
    pattern_bars,
    save_figure,
)
from sgma.metrics import build_report
from sgma.modalities import all_patterns
from sgma.panels import SamplePanel, collect_panels, mean_robustness, panel_indices, panel_patterns
from sgma.tasks import evaluate

MODALITIES = ["rgb", "nir", "dsm"]
PATTERNS = all_patterns(MODALITIES)


def assert_png(path: Path, fig: Figure) -> None:
    """``path`` is a whole PNG of exactly the figure's size, and no temporary file is left beside it."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = fig.get_size_inches() * DPI
        assert image.size == (round(width), round(height))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def real_report():
    """A report of real counts: 3 patterns x 6 classes, one pattern perfect, one without car pixels."""
    gen = torch.Generator().manual_seed(0)
    confmat = torch.randint(0, 50, (len(PATTERNS), 6, 6), generator=gen)
    confmat[0] = torch.diag(torch.arange(1, 7)) * 10
    confmat[1, 4, :] = 0
    samples = torch.tensor([2, 2, 0, 2, 0, 0, 2])
    return build_report(confmat, samples, all_patterns=PATTERNS, class_names=CLASSES), confmat


def test_pattern_bars_and_confusion_figures(tmp_path):
    report, confmat = real_report()
    assert [r.pattern for r in report.patterns] == ["rgb", "nir", "rgb+nir", "rgb+nir+dsm"]
    assert report.patterns[0].confusion == confmat[0].tolist()
    for metric in ("miou", "mf1", "oa"):
        fig = pattern_bars(report, metric)
        assert isinstance(fig, Figure)
        assert_png(save_figure(fig, tmp_path / f"bars_{metric}.png"), fig)
    assert [t.get_text() for t in pattern_bars(report).axes[0].get_xticklabels()] == [
        r.pattern for r in report.patterns
    ]
    for normalise in (True, False):
        fig = confusion_figure(np.asarray(report.patterns[1].confusion), CLASSES, "nir", normalise=normalise)
        assert_png(save_figure(fig, tmp_path / f"confusion_{normalise}.png"), fig)
    # normalised rows are shares of the true class; the car row (no pixels) stays blank
    shown = confusion_figure(confmat[1].numpy(), CLASSES, "t").axes[0].images[0].get_array()
    assert np.isclose(shown[0].sum(), 1) and np.ma.getmaskarray(shown)[4].all()
    with pytest.raises(ValueError, match="does not match the 5 class names"):
        confusion_figure(confmat[0].numpy(), CLASSES[:5], "t")
    with pytest.raises(ValueError, match="metric must be one of"):
        pattern_bars(report, "iou")
    with pytest.raises(ValueError, match=r"ending in \.png"):
        save_figure(pattern_bars(report), tmp_path / "bars.jpg")


def test_curves_figure(tmp_path):
    history = {
        "train/loss": [(2, 1.5), (1, 2.0)],
        "val/loss": [(1, 1.8), (2, 1.6)],
        "val/avg/miou": [(1, 0.2), (2, 0.3)],
        "mas/rho_rgb": [(1, 1.1), (2, 1.2)],
        "mas/rho_dsm": [(1, 0.9), (2, 0.8)],
        "mas/present_rgb": [],
    }
    assert [curve_group(n) for n in history] == ["loss", "loss", "miou", "rho", "rho", "present"]
    fig = curves_figure(history, "tiny")
    assert_png(save_figure(fig, tmp_path / "curves.png"), fig)
    drawn = [ax for ax in fig.axes if ax.lines]
    assert len(drawn) == 3  # loss, miou, rho; the empty series draws nothing
    assert list(drawn[0].lines[0].get_xdata()) == [1, 2]  # points sorted by step
    with pytest.raises(ValueError, match="no curves to draw"):
        curves_figure({"train/loss": []}, "t")


def _panel(pattern: str, robustness: bool, label: np.ndarray) -> SamplePanel:
    rng = np.random.default_rng(0)
    available = tuple(pattern.split("+"))
    maps = rng.dirichlet(np.ones(len(available)), size=(16, 16)).astype(np.float32)
    return SamplePanel(
        index=3,
        pattern=pattern,
        inputs={m: rng.random((16, 16, 3), dtype=np.float32) for m in MODALITIES},
        available=available,
        label=label,
        prediction=rng.integers(0, 6, (16, 16)),
        robustness={m: maps[..., i] for i, m in enumerate(available)} if robustness else {},
    )


def test_panel_figure(tmp_path):
    label = np.random.default_rng(1).integers(0, 6, (16, 16))
    label[:2] = 255
    panels = [_panel(p, True, label) for p in ("rgb+nir+dsm", "rgb", "nir+dsm")]
    fig = panel_figure(panels, CLASSES, PALETTE)
    assert_png(save_figure(fig, tmp_path / "samples_3.png"), fig)
    maps = [im for ax in fig.axes for im in ax.images if im.get_array().ndim == 2]  # RGB images are 3-D
    assert len(maps) == 3 + 1 + 2 and all(im.get_clim() == (0.0, 1.0) for im in maps)  # one shared scale
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
    assert [h.get_text() for h in fig.legends[0].get_texts()] == [*CLASSES, "ignored"]
    assert "nir (missing)" in [ax.get_title() for ax in fig.axes]
    # a fusion without robustness maps: inputs, label and prediction only
    plain = panel_figure([_panel("rgb", False, label)], CLASSES, PALETTE)
    assert len([ax for ax in plain.axes if ax.images]) == len(MODALITIES) + 2
    with pytest.raises(ValueError, match="one RGB triple"):
        panel_figure(panels, CLASSES, PALETTE[:5])
    with pytest.raises(ValueError, match="draws one sample"):
        panel_figure([panels[0], SamplePanel(**{**panels[1].__dict__, "index": 4})], CLASSES, PALETTE)
    bad = _panel("rgb", True, np.full((16, 16), 7))
    with pytest.raises(ValueError, match=r"class ids \[7\] have no palette colour"):
        panel_figure([bad], CLASSES, PALETTE)


def test_panel_choices():
    assert panel_indices(48) == [0, 16, 31, 47]
    assert panel_indices(2) == [0, 1] and panel_indices(5, 1) == [0]
    assert panel_patterns(PATTERNS) == ["rgb+nir+dsm", "rgb", "rgb+nir"]
    assert panel_patterns(["rgb", "nir+dsm"]) == ["nir+dsm", "rgb"]
    assert panel_patterns(["rgb+dsm", "nir"], count=1) == ["rgb+dsm"]
    with pytest.raises(ValueError, match="is the split empty"):
        panel_indices(0)
    with pytest.raises(ValueError, match="no patterns"):
        panel_patterns([])


def _rebuild(ckpt: Path):
    state = load_checkpoint(str(ckpt))
    cfg = OmegaConf.create(state[CHECKPOINT_KEY]["config"])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    module.load_state_dict(state["state_dict"])
    return dm, module


def test_collect_panels_match_the_model(sgma_ckpt):
    dm, module = _rebuild(sgma_ckpt)
    data = dm.dataset("val")
    indices, patterns = panel_indices(len(data)), panel_patterns(dm.patterns)
    module.train()
    panels = collect_panels(module, data, indices, patterns)
    assert module.training  # mode restored
    assert [(p.index, p.pattern) for p in panels] == [(i, p) for i in indices for p in patterns]
    size = dm.dataset("val")[(0, 0)]["mask"].shape
    module.eval()
    for pattern in patterns:
        pid = dm.patterns.index(pattern)
        batch = default_collate([data[(i, pid)] for i in indices])
        with torch.no_grad():
            out = module(batch, return_robustness=True)
        maps = mean_robustness(out.robustness, tuple(size))
        for b, i in enumerate(indices):
            p = panels[indices.index(i) * len(patterns) + patterns.index(pattern)]
            assert p.available == tuple(pattern.split("+"))
            assert set(p.inputs) == set(MODALITIES)  # missing modalities are shown too
            for image in p.inputs.values():
                assert image.shape == (*size, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
            assert p.label.shape == p.prediction.shape == tuple(size) and p.label.dtype == np.int64
            assert np.array_equal(p.label, batch["mask"][b].numpy())
            assert np.array_equal(p.prediction, out.logits[b].argmax(0).numpy())
            assert set(p.robustness) == set(p.available)  # missing modalities have no map
            assert np.allclose(sum(p.robustness.values()), 1, atol=1e-5)
            assert all(r.min() >= 0 and r.max() <= 1 for r in p.robustness.values())
            for m, r in p.robustness.items():
                np.testing.assert_allclose(r, maps[b, MODALITIES.index(m)].numpy(), atol=1e-6)
    # a withheld modality still shows its real input
    assert panels[1].pattern == "rgb" and panels[1].inputs["dsm"].std() > 0
    with pytest.raises(ValueError, match="outside this split"):
        collect_panels(module, data, [len(data)], patterns)
    with pytest.raises(ValueError, match="this dataset's patterns"):
        collect_panels(module, data, [0], ["rgb+sar"])


def test_collect_panels_without_robustness_maps(tmp_path):
    cfg = compose_config("train", ["debug=tiny", "model=baseline"])
    GlobalHydra.instance().clear()
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm).eval()
    panels = collect_panels(module, dm.dataset("val"), [1], ["rgb", "nir+dsm"])
    assert [p.robustness for p in panels] == [{}, {}] and not module.training
    fig = panel_figure(panels, dm.classes, dm.palette)
    assert_png(save_figure(fig, tmp_path / "samples_1.png"), fig)


def _labelled_pixels(dm, split: str) -> int:
    data = dm.dataset(split)
    return sum(int((data[(i, 0)]["mask"] != 255).sum()) for i in range(len(data)))


def _plot_names(folder: Path) -> set[str]:
    return {p.name for p in (folder / "plots").iterdir()}


def test_train_leaves_plots(sgma_ckpt):
    """The shared tiny SGMA run (MAS sampler, test=false: its chart and matrices are the last validation's)."""
    run = sgma_ckpt.parent.parent
    num_val = OmegaConf.load(run / "config.yaml").dataset.splits.val.num_samples
    expected = {"patterns_miou.png", "curves.png", *[f"confusion_{p}.png" for p in PATTERNS]}
    expected |= {f"samples_{i}.png" for i in panel_indices(num_val)}
    assert _plot_names(run) == expected
    for name in expected:
        with Image.open(run / "plots" / name) as image:
            image.verify()
    # the curves' history: train loss and MAS values per epoch, validation per validation; kept in checkpoints
    ckpt = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)
    history = ckpt["callbacks"]["MetricHistory"]["history"]
    assert {"train/loss", "val/loss", "val/avg/miou", "mas/present_rgb", "mas/rho_dsm"} <= set(history)
    assert all(len(points) == 1 and points[0][0] == 1 for points in history.values())


def test_eval_leaves_plots_and_confusion_matrices(sgma_ckpt, tmp_path):
    cfg = bind_to(compose_config("eval", [f"ckpt_path={sgma_ckpt}", "patterns=[dsm,rgb+nir]"]), tmp_path)
    _, objects = evaluate(cfg)
    GlobalHydra.instance().clear()
    dm = objects["datamodule"]
    assert _plot_names(tmp_path) == {
        "patterns_miou.png",
        "confusion_dsm.png",
        "confusion_rgb+nir.png",
        *[f"samples_{i}.png" for i in panel_indices(len(dm.dataset("test")))],
    }
    table = json.loads((tmp_path / "patterns.json").read_text())
    assert table["class_names"] == list(CLASSES) and table["confusion_axes"] == ["true", "predicted"]
    labelled = _labelled_pixels(dm, "test")
    assert [r["pattern"] for r in table["patterns"]] == ["dsm", "rgb+nir"]
    for row in table["patterns"]:
        cm = np.asarray(row["confusion"])
        assert cm.shape == (6, 6) and cm.sum() == labelled
        assert np.isclose(np.diag(cm).sum() / cm.sum(), row["oa"])


def test_a_plotting_failure_keeps_the_table(sgma_ckpt, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "plots").write_text("a file where the plots folder goes")
    cfg = bind_to(compose_config("eval", [f"ckpt_path={sgma_ckpt}", "patterns=[rgb]"]), out)
    with pytest.raises(OSError) as err:
        evaluate(cfg)
    GlobalHydra.instance().clear()
    assert any("the pattern table there is complete" in note for note in getattr(err.value, "__notes__", []))
    assert [r["pattern"] for r in json.loads((out / "patterns.json").read_text())["patterns"]] == ["rgb"]
