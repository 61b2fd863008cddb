"""Sliding-window inference, full-tile evaluation and predict.py on tiny fake data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from conftest import bind_to, compose_config
from sgma.data.fake import make_fake_potsdam, write_geotiff
from sgma.data.isprs import PALETTE
from sgma.inference import blend_weights, normalise_inputs, predict, sliding_window_logits, window_starts
from sgma.modalities import Modality, all_patterns
from sgma.models.segmentor import SegmentorOutput

MODS = (Modality("rgb", 3, (0.0,) * 3, (1.0,) * 3), Modality("dsm", 1, (0.0,), (1.0,)))


class PixelNet(torch.nn.Module):
    """Translation-equivariant: logits are a per-pixel linear map of the inputs (so windows agree)."""

    modalities = MODS

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, k, 1)

    def forward(self, inputs, available, return_robustness=False):
        x = torch.cat([inputs["rgb"], inputs["dsm"]], dim=1)
        rob = [available.float()[:, :, None, None].expand(-1, -1, 4, 4) / available.sum(1).view(-1, 1, 1, 1)]
        return SegmentorOutput(self.conv(x), rob if return_robustness else None)


class CountNet(torch.nn.Module):
    """Outputs a constant per window: the index of the call's window (to check convex blending)."""

    modalities = MODS

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, inputs, available, return_robustness=False):
        b, _, h, w = inputs["rgb"].shape
        values = torch.arange(self.calls, self.calls + b, dtype=torch.float32)
        self.calls += b
        return SegmentorOutput(values.view(b, 1, 1, 1).expand(b, 2, h, w).clone())


def tile(h: int, w: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randn(3, h, w, generator=g), "dsm": torch.randn(1, h, w, generator=g)}


def test_window_equals_full_forward():
    net, x = PixelNet().eval(), tile(64, 64)
    out = sliding_window_logits(net, x, [True, True], window=64, overlap=0.5, blend="gaussian", num_classes=3)
    full = net({k: v[None] for k, v in x.items()}, torch.ones(1, 2, dtype=torch.bool)).logits[0]
    torch.testing.assert_close(out, full.detach())


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
@pytest.mark.parametrize("shape", [(100, 70), (40, 20), (64, 200)])
def test_shapes_and_equivariant_blend(blend, shape):
    net, x = PixelNet().eval(), tile(*shape)
    out, rob = sliding_window_logits(
        net,
        x,
        [True, False],
        window=32,
        overlap=0.25,
        blend=blend,
        batch_size=3,
        num_classes=3,
        return_robustness=True,
    )
    assert out.shape == (3, *shape) and out.dtype == torch.float32 and rob.shape == (2, *shape)
    masked = {"rgb": x["rgb"][None], "dsm": torch.zeros(1, 1, *shape)}  # the missing dsm is fed as zeros
    full = net(masked, torch.tensor([[True, False]])).logits[0].detach()
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)  # windows agree -> any blend gives the same
    torch.testing.assert_close(rob, torch.tensor([1.0, 0.0]).view(2, 1, 1).expand(2, *shape))


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_overlap_blend_is_convex(blend):
    net, x = CountNet(), tile(80, 80)
    out = sliding_window_logits(net, x, [True, True], window=32, overlap=0.5, blend=blend, num_classes=2, batch_size=4)
    s = len(window_starts(80, 32, 0.5))  # starts 0, 16, 32, 48
    n = s * s
    assert net.calls == n
    assert float(out.min()) >= -1e-4 and float(out.max()) <= n - 1 + 1e-4
    assert float(out[0, 0, 0]) == 0 and abs(float(out[0, -1, -1]) - (n - 1)) < 1e-4  # corners: one window
    inner = out[0, 20, 20]  # covered by windows 0, 1, s, s + 1
    assert 0 < float(inner) < s + 1 and float(inner) not in (1.0, float(s))
    if blend == "mean":
        assert abs(float(inner) - (2 * s + 2) / 4) < 1e-5


def test_gaussian_weights():
    w = blend_weights(64, "gaussian")
    assert w.shape == (64, 64) and bool((w > 0).all()) and float(w.max()) == 1.0
    assert float(w[0, 0]) < float(w[0, 32]) < float(w[32, 32]) and float(w[0, 0]) < 0.05
    torch.testing.assert_close(w, w.T)
    assert bool((blend_weights(32, "mean") == 1).all())
    with pytest.raises(ValueError, match="blend"):
        blend_weights(32, "hann")


def test_bad_options():
    net, x = PixelNet(), tile(32, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        sliding_window_logits(net, x, [True, True], window=50, num_classes=3)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_logits(net, x, [True, True], window=32, overlap=1.0, num_classes=3)
    with pytest.raises(ValueError, match="sizes disagree"):
        sliding_window_logits(net, {**x, "dsm": torch.zeros(1, 32, 40)}, [True, True], window=32, num_classes=3)


def test_normalise_inputs():
    mods = (Modality("rgb", 3, (10.0, 20.0, 30.0), (2.0, 2.0, 2.0)), Modality("dsm", 1, (1.0,), (4.0,)))
    raw = {"rgb": np.full((3, 4, 4), 30, np.uint8), "dsm": np.full((4, 4), 9, np.float16)}
    out = normalise_inputs(raw, mods, [True, False])
    assert set(out) == {"rgb"} and out["rgb"].dtype == torch.float32
    assert out["rgb"][:, 0, 0].tolist() == [10.0, 5.0, 0.0]
    assert float(normalise_inputs(raw, mods)["dsm"][0, 0, 0]) == 2.0


# ------------------------------------------------------------------------------------------ integration
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny baseline trained on a fake Potsdam (64 px crops, 96 px tiles): (checkpoint, data root)."""
    root = make_fake_potsdam(tmp_path_factory.mktemp("potsdam"))
    out = tmp_path_factory.mktemp("run")
    overrides = ["debug=tiny", "dataset=potsdam", f"dataset.builder.root={root}", "logger=csv", "model=baseline"]
    overrides += ["dataset.builder.crop_size=64", "dataset.builder.progress=false", "data.batch_size=2"]
    overrides += ["dataset.splits.train.num_samples=2", "dataset.splits.val.num_samples=1"]
    overrides += ["dataset.splits.test.num_samples=1"]
    cfg = bind_to(compose_config("train", overrides), out)
    from sgma.tasks import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    return out / "checkpoints" / "last.ckpt", root


def test_full_tile_eval(trained, tmp_path):
    from sgma.tasks import evaluate

    ckpt, _ = trained
    cfg = bind_to(
        compose_config(  # the form: naming the checkpoint's dataset again keeps its data root
            "eval",
            [
                f"ckpt_path={ckpt}",
                "dataset=potsdam",
                "dataset.size=64",
                "eval.full_tile=true",
                "eval.window=64",
                "eval.blend=gaussian",
            ],
        ),
        tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, objects = evaluate(cfg)
    patterns = all_patterns(["rgb", "nir", "dsm"])
    table = json.loads((tmp_path / "patterns.json").read_text())
    assert [r["pattern"] for r in table["patterns"]] == patterns
    assert table["excluded_classes"] == ["clutter"]  # ISPRS: 5-class means
    assert table["full_tile"] == {"window": 64, "overlap": 0.25, "blend": "gaussian"}
    assert (tmp_path / "patterns.csv").is_file() and (tmp_path / "patterns.md").is_file()
    assert 0 <= metrics["test/avg/miou"] <= 1
    base = objects["datamodule"].dataset("test").base
    assert len(base.tiles) == 14  # every test tile, whole: 7 patterns x 14 tiles scored


def test_full_tile_needs_tiles(cfg_train, tmp_path):
    from sgma.tasks import evaluate, train

    with open_dict(cfg_train):
        cfg_train.test = False
    train(cfg_train)
    ckpt = Path(cfg_train.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = bind_to(
        compose_config("eval", [f"ckpt_path={ckpt}", "eval.full_tile=true", "eval.window=64"]), tmp_path / "e"
    )
    with pytest.raises(ValueError, match="whole tiles"):
        evaluate(cfg)


def _predict_cfg(ckpt, folder, out, *extra):
    args = [f"ckpt_path={ckpt}", f"input={folder}", f"output_dir={out}", "window=64", "trainer.accelerator=cpu"]
    return bind_to(compose_config("predict", [*args, *extra]), out)


def _scene(h=90, w=100):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (3, h, w), dtype=np.uint8), rng.integers(0, 255, (1, h, w), dtype=np.uint8)


def test_predict_geotiff(trained, tmp_path):
    import rasterio

    ckpt, _ = trained
    rgb, dsm = _scene()
    write_geotiff(tmp_path / "in" / "rgb.tif", rgb, origin=(366000.0, 5808000.0))
    write_geotiff(tmp_path / "in" / "dsm.tif", dsm, origin=(366000.0, 5808000.0))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = predict(_predict_cfg(ckpt, tmp_path / "in", out, "pattern=dsm+rgb", "robustness=true"))
    assert result["pattern"] == "rgb+dsm" and result["georeferenced"]
    with rasterio.open(out / "prediction.tif") as src, rasterio.open(tmp_path / "in" / "rgb.tif") as ref:
        assert src.crs == ref.crs and src.transform == ref.transform and src.count == 3
        colours = src.read()
    assert colours.shape == (3, 90, 100)
    seen = {tuple(c) for c in colours.reshape(3, -1).T.tolist()}
    assert seen <= set(PALETTE)
    expected = np.asarray(PALETTE, np.uint8)[result["classes"]].transpose(2, 0, 1)
    assert (colours == expected).all()
    # baseline (mean fusion) has no robustness maps: warned, nothing written
    assert not (out / "robustness.tif").exists()


def test_predict_png_and_errors(trained, tmp_path):
    from PIL import Image

    ckpt, _ = trained
    rgb, dsm = _scene(70, 50)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb.transpose(1, 2, 0), "RGB").save(folder / "rgb.png")
    Image.fromarray(dsm[0], "L").save(folder / "dsm.png")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = predict(_predict_cfg(ckpt, folder, out, "pattern=rgb+dsm"))
        assert not result["georeferenced"] and result["files"]["prediction"] == out / "prediction.png"
        image = np.asarray(Image.open(out / "prediction.png"))
        assert image.shape == (70, 50, 3) and {tuple(c) for c in image.reshape(-1, 3).tolist()} <= set(PALETTE)

        with pytest.raises(FileNotFoundError, match="'nir'"):
            predict(_predict_cfg(ckpt, folder, out, "pattern=rgb+nir"))
        with pytest.raises(ValueError, match="sar"):
            predict(_predict_cfg(ckpt, folder, out, "pattern=rgb+sar"))
        Image.fromarray(dsm[0, :60], "L").save(folder / "dsm.png")
        with pytest.raises(ValueError, match="different sizes"):
            predict(_predict_cfg(ckpt, folder, out, "pattern=rgb+dsm"))
        Image.fromarray(rgb[0], "L").save(folder / "rgb.png")
        with pytest.raises(ValueError, match="band"):
            predict(_predict_cfg(ckpt, folder, out, "pattern=rgb"))


def test_predict_without_the_training_data(tmp_path):
    """The checkpoint carries normalisation, classes and palette: predict runs after the data is gone."""
    import shutil

    root = make_fake_potsdam(tmp_path / "potsdam")
    run = tmp_path / "run"
    cfg = bind_to(
        compose_config(
            "train",
            ["debug=tiny", "dataset=potsdam", f"dataset.builder.root={root}", "model=sgma", "logger=csv", "test=false"],
        ),
        run,
    )
    from sgma.tasks import train

    _, objects = train(cfg)
    expected_stats = [m.mean for m in objects["datamodule"].modalities]
    ckpt = run / "checkpoints" / "last.ckpt"
    shutil.rmtree(root)  # data and its cache are gone
    rgb, dsm = _scene()
    write_geotiff(tmp_path / "in" / "rgb.tif", rgb, origin=(366000.0, 5808000.0))
    write_geotiff(tmp_path / "in" / "dsm.tif", dsm, origin=(366000.0, 5808000.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = predict(_predict_cfg(ckpt, tmp_path / "in", tmp_path / "out", "pattern=rgb+dsm", "robustness=true"))
    assert result["pattern"] == "rgb+dsm" and (tmp_path / "out" / "prediction.tif").is_file()
    assert (tmp_path / "out" / "robustness.tif").is_file()  # SGF writes its maps
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["sgma"]["dataset"]
    assert [tuple(m["mean"]) for m in stored["modalities"]] == expected_stats


# ------------------------------------------------------------------------------ bad input, safe outputs


def _write_tiff(path, array, *, georeferenced=True, nodata=None):
    """A GeoTIFF, or a plain TIFF without CRS (predict then writes PNGs)."""
    import rasterio

    if georeferenced:
        write_geotiff(path, array, origin=(366000.0, 5808000.0), nodata=nodata)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": array.shape[1], "width": array.shape[2], "count": array.shape[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: intended
        with rasterio.open(path, "w", **profile, dtype=array.dtype.name, nodata=nodata) as dst:
            dst.write(array)


def _bad_scene(folder, georeferenced=True):
    """rgb (uint8, nodata 0 at 6 px) and dsm (float32: 200 NaN, 1 inf, 50 px of its nodata -9999); the mask."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(1, 255, (3, 90, 100), dtype=np.uint8)
    rgb[:, 0:2, 0:3] = 0
    dsm = rng.normal(10.0, 3.0, (1, 90, 100)).astype(np.float32)
    dsm[0, 10:20, 10:30] = np.nan
    dsm[0, 50, 50] = np.inf
    dsm[0, 70:75, 80:90] = -9999.0
    _write_tiff(folder / "rgb.tif", rgb, georeferenced=georeferenced, nodata=0)
    _write_tiff(folder / "dsm.tif", dsm, georeferenced=georeferenced, nodata=-9999.0)
    invalid = np.zeros((90, 100), bool)
    invalid[0:2, 0:3] = invalid[10:20, 10:30] = invalid[70:75, 80:90] = True
    invalid[50, 50] = True
    return invalid


@pytest.mark.parametrize("georeferenced", [True, False])
def test_predict_fills_counts_and_marks_nodata(sgma_ckpt, tmp_path, caplog, georeferenced):
    """NaN / inf / nodata in the inputs: filled, counted per modality in one warning, nodata in every output."""
    import rasterio
    from PIL import Image

    invalid = _bad_scene(tmp_path / "in", georeferenced)
    out = tmp_path / "out"
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="sgma"):
        warnings.simplefilter("ignore")
        result = predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, "pattern=rgb+dsm", "robustness=true"))
    classes = result["classes"]
    assert (classes[invalid] == 255).all() and (classes[~invalid] < 6).all()
    assert result["nodata_pixels"] == int(invalid.sum()) == 257
    assert result["invalid_counts"] == {
        "rgb": {"nan": 0, "inf": 0, "nodata": 6, "pixels": 6},
        "dsm": {"nan": 200, "inf": 1, "nodata": 50, "pixels": 251},
    }
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert "rgb: 6 no-data" in warned[0] and "dsm: 200 NaN, 1 inf, 50 no-data" in warned[0]
    assert "257 pixel(s) are marked nodata" in warned[0]
    if georeferenced:
        with rasterio.open(out / "prediction.tif") as src:
            assert src.count == 3 and (src.dataset_mask() == 0).tolist() == invalid.tolist()
        with rasterio.open(out / "robustness.tif") as src:
            maps = src.read()
            assert src.nodata == -1.0 and [src.descriptions[i] for i in range(2)] == ["rgb", "dsm"]
        assert np.isfinite(maps).all() and (maps[:, invalid] == -1).all()
        assert (maps[:, ~invalid] >= 0).all() and np.allclose(maps[:, ~invalid].sum(axis=0), 1, atol=1e-4)
    else:
        image = np.asarray(Image.open(out / "prediction.png"))
        assert image.shape == (90, 100, 4) and ((image[..., 3] == 0) == invalid).all()
        rob = np.asarray(Image.open(out / "robustness_dsm.png"))
        assert rob.shape == (90, 100, 2) and ((rob[..., 1] == 0) == invalid).all()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_predict_refuses_a_modality_without_data(sgma_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    write_geotiff(tmp_path / "in" / "rgb.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    write_geotiff(tmp_path / "in" / "dsm.tif", np.full((1, 64, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"'dsm' has no valid pixel .*pattern=rgb"):
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", tmp_path / "out", "pattern=rgb+dsm"))


def test_predict_outputs_are_whole_or_absent(sgma_ckpt, tmp_path, monkeypatch):
    """No overwrite without overwrite=true; a write that fails midway leaves the earlier outputs as they were."""
    import sgma.inference as inference

    rgb, dsm = _scene()
    write_geotiff(tmp_path / "in" / "rgb.tif", rgb, origin=(366000.0, 5808000.0))
    write_geotiff(tmp_path / "in" / "dsm.tif", dsm, origin=(366000.0, 5808000.0))
    out = tmp_path / "out"
    args = ("pattern=rgb+dsm", "robustness=true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, *args))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert set(before) == {"prediction.tif", "robustness.tif"}

        with pytest.raises(FileExistsError, match=r"prediction.tif, robustness.tif .*overwrite=true"):
            predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, *args))

        real_write = inference.write_raster

        def disk_full_on_robustness(path, array, geo, **kwargs):
            written = real_write(path, array, geo, **kwargs)
            if path.name == "robustness":  # half the file is on disk when the disk fills up
                written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
                raise OSError(28, "No space left on device")
            return written

        monkeypatch.setattr(inference, "write_raster", disk_full_on_robustness)
        with pytest.raises(OSError, match="No space left"):
            predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, *args, "overwrite=true"))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no staging folder left
        monkeypatch.undo()

        rgb[:, :10] = 0  # a different scene: overwrite=true replaces both files
        write_geotiff(tmp_path / "in" / "rgb.tif", rgb, origin=(366000.0, 5808000.0))
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, *args, "overwrite=true"))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) and after["prediction.tif"] != before["prediction.tif"]


def test_input_rasters_say_what_they_are(tmp_path):
    from PIL import Image

    from sgma.inference import find_modality_files, read_input_raster

    with pytest.raises(FileNotFoundError, match=r"input=.* does not exist"):
        find_modality_files(tmp_path / "nowhere", ["rgb"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"input=.* is a file"):
        find_modality_files(tmp_path / "file", ["rgb"])
    (tmp_path / "dsm.tif").mkdir()
    with pytest.raises(IsADirectoryError, match=r"dsm.tif' is a folder"):
        read_input_raster(tmp_path / "dsm.tif")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(OSError, match="is empty"):
        read_input_raster(tmp_path / "empty.tif")
    rgb, _ = _scene(300, 300)
    Image.fromarray(rgb.transpose(1, 2, 0), "RGB").save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])  # GDAL alone reads the missing half as zeros
    with pytest.raises(OSError, match=r"half.png' is truncated or corrupt"):
        read_input_raster(tmp_path / "half.png")
    write_geotiff(tmp_path / "whole.tif", rgb)
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"half.tif': it is truncated, corrupt"):
        read_input_raster(tmp_path / "half.tif")
