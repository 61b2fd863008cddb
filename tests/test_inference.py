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
        compose_config(  # the issue's form: naming the checkpoint's dataset again keeps its data root
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
    """rgb (reflectance as the synthetic training data, nodata 0 at 6 px) and dsm (metres, float32: 200 NaN, 1 inf,
    50 px of its nodata -9999); the mask."""
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0.05, 0.7, (3, 90, 100)).astype(np.float32)
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


def test_predict_warns_about_inputs_on_another_value_scale(sgma_ckpt, tmp_path, caplog):
    """The model learnt reflectance in [0, 1] (synthetic rgb) and heights in metres; 16-bit digital numbers are
    predicted, with a warning naming the modality, the file, both scales and the likely causes."""
    rng = np.random.default_rng(0)
    dsm = rng.normal(5.0, 4.0, (1, 64, 64)).astype(np.float32)
    write_geotiff(tmp_path / "ok" / "rgb.tif", rng.uniform(0.1, 0.6, (3, 64, 64)).astype(np.float32))
    write_geotiff(tmp_path / "ok" / "dsm.tif", dsm)
    write_geotiff(tmp_path / "dn" / "rgb.tif", rng.integers(0, 4000, (3, 64, 64), dtype=np.uint16))
    write_geotiff(tmp_path / "dn" / "dsm.tif", dsm)
    for scene in ("ok", "dn"):
        with caplog.at_level("WARNING", logger="sgma"):
            predict(_predict_cfg(sgma_ckpt, tmp_path / scene, tmp_path / f"out_{scene}", "pattern=rgb+dsm"))
        warned = [r.getMessage() for r in caplog.records if "standard deviations off" in r.getMessage()]
        if scene == "ok":
            assert not warned, warned
            continue
        assert len(warned) == 1 and warned[0].startswith(f"input rgb ({tmp_path / 'dn' / 'rgb.tif'}): mean value")
        assert "where the training data's is [0.355, 0.363, 0.304]" in warned[0] and "bit depth" in warned[0]
        assert (tmp_path / "out_dn" / "prediction.tif").is_file()


def test_predict_refuses_a_modality_without_data(sgma_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    write_geotiff(tmp_path / "in" / "rgb.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    write_geotiff(tmp_path / "in" / "dsm.tif", np.full((1, 64, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"'dsm' has no valid pixel .*pattern=rgb"):
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", tmp_path / "out", "pattern=rgb+dsm"))


def test_predict_refuses_rasters_on_different_grids(sgma_ckpt, tmp_path, caplog):
    """Same size is not same grid: CRS and pixel grid are compared (to 1/100 px); rasters without a georeference
    beside georeferenced ones are warned about, since only their size can be checked."""
    from PIL import Image

    rng = np.random.default_rng(5)
    rgb, nir = (rng.uniform(0.1, 0.6, (c, 64, 64)).astype(np.float32) for c in (3, 1))  # the training scales
    dsm = rng.integers(0, 15, (1, 64, 64), dtype=np.uint8)  # metres, and a PNG can hold it
    folder, out = tmp_path / "in", tmp_path / "out"
    write_geotiff(folder / "rgb.tif", rgb, origin=(500000.0, 5800000.0), gsd=0.05, epsg=32633)
    write_geotiff(folder / "nir.tif", nir, origin=(500000.0, 5800000.0), gsd=0.05, epsg=32633)
    write_geotiff(folder / "dsm.tif", dsm, origin=(300000.0, 4000000.0), gsd=1.0, epsg=32632)
    with pytest.raises(ValueError, match="not on one grid") as err:
        predict(_predict_cfg(sgma_ckpt, folder, out))
    message = str(err.value)
    assert f"{str(folder / 'rgb.tif')!r} (the first georeferenced one" in message and "nir.tif" not in message
    assert "EPSG:32633, origin (500000.0, 5800000.0), pixel size (0.05, -0.05)" in message
    assert f"{str(folder / 'dsm.tif')!r}: EPSG:32632, origin (300000.0, 4000000.0), pixel size (1.0, -1.0)" in message
    assert "gdalwarp -t_srs EPSG:32633 -te 500000.0 5799996.8 500003.2 5800000.0 -ts 64 64" in message
    write_geotiff(folder / "dsm.tif", dsm, origin=(500000.025, 5800000.0), gsd=0.05, epsg=32633)  # half a pixel
    with pytest.raises(ValueError, match=r"dsm.tif': EPSG:32633, origin \(500000.025, 5800000.0\)"):
        predict(_predict_cfg(sgma_ckpt, folder, out))
    assert list(out.iterdir()) == []

    write_geotiff(folder / "dsm.tif", dsm, origin=(500000.0 + 1e-9, 5800000.0), gsd=0.05 + 1e-12, epsg=32633)
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="sgma"):
        warnings.simplefilter("ignore")
        assert predict(_predict_cfg(sgma_ckpt, folder, out))["georeferenced"]  # float noise is the same grid
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        (folder / "dsm.tif").unlink()
        Image.fromarray(dsm[0]).save(folder / "dsm.png")
        predict(_predict_cfg(sgma_ckpt, folder, out, "overwrite=true"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert f"raster(s) have no georeference while others of their scene have one: {folder / 'dsm.png'}" in warned[0]


def test_predict_band_count_error_says_what_to_give(sgma_ckpt, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "rgb.png")  # greyscale
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "dsm.png")
    with pytest.raises(ValueError) as err:
        predict(_predict_cfg(sgma_ckpt, folder, tmp_path / "out", "pattern=rgb+dsm"))
    assert str(err.value) == (
        f"{str(folder / 'rgb.png')!r} has 1 band(s) but modality 'rgb' has 3: give rgb as a 3-band raster, its bands "
        "in the order of the model's training data (the checkpoint records the count, not the band names), or "
        "predict without it: pattern=dsm"
    )
    with pytest.raises(ValueError, match=r"has 3: give rgb as a 3-band raster.*band names\)$"):
        predict(_predict_cfg(sgma_ckpt, folder, tmp_path / "out", "pattern=rgb"))  # no other modality to fall back on


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
    scene = tmp_path / "scene"
    scene.mkdir()
    (scene / "rgb.png").write_bytes(b"")
    (scene / "dsm.webp").write_bytes(b"")  # the modality is there, in a format predict does not read
    with pytest.raises(FileNotFoundError, match=r"no raster for modality 'dsm' .*\['dsm.webp'\] is in a format"):
        find_modality_files(scene, ["rgb", "dsm"])
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


# --------------------------------------------------------------------- folders of scenes, input transforms
def _batch_tree(folder, stems=("a", "b"), *, dsm_stems=None, h=40, w=50):
    """``<folder>/<modality>/<stem>``: scene a as GeoTIFFs, the others as PNGs; labels/ and nir/ are not in the
    pattern rgb+dsm and must be ignored."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for i, stem in enumerate(stems):
        rgb = rng.integers(0, 255, (3, h, w), dtype=np.uint8)
        dsm = rng.integers(0, 255, (1, h, w), dtype=np.uint8)
        if i == 0:
            write_geotiff(folder / "rgb" / f"{stem}.tif", rgb, origin=(366000.0, 5808000.0))
            if dsm_stems is None or stem in dsm_stems:
                write_geotiff(folder / "dsm" / f"{stem}.tif", dsm, origin=(366000.0, 5808000.0))
            continue
        for name, array in (("rgb", rgb), ("dsm", dsm)):
            if name == "dsm" and dsm_stems is not None and stem not in dsm_stems:
                continue
            (folder / name).mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(array.transpose(1, 2, 0), "RGB") if name == "rgb" else Image.fromarray(array[0])
            image.save(folder / name / f"{stem}.png")
    (folder / "labels").mkdir(exist_ok=True)
    (folder / "nir").mkdir(exist_ok=True)
    (folder / "dataset.yaml").write_text("name: x\n")


def test_predict_folder_of_scenes(sgma_ckpt, tmp_path, caplog):
    """<input>/<modality>/<stem>: every stem predicted into <out>/<stem>/, as the one-scene mode predicts it."""
    from PIL import Image

    _batch_tree(tmp_path / "in")
    out = tmp_path / "out"
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="sgma"):
        warnings.simplefilter("ignore")
        result = predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, "pattern=rgb+dsm"))
    assert result["pattern"] == "rgb+dsm" and list(result["scenes"]) == ["a", "b"]
    a, b = result["scenes"]["a"], result["scenes"]["b"]
    assert "classes" not in a and a["georeferenced"] and not b["georeferenced"]
    assert a["files"] == {"prediction": out / "a" / "prediction.tif"}
    assert b["files"] == {"prediction": out / "b" / "prediction.png"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "a",
        "a/prediction.tif",
        "b",
        "b/prediction.png",
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert "scene 1/2: a" in messages and "scene 2/2: b" in messages

    single = tmp_path / "single"  # scene b alone in the one-scene layout: the same colours
    single.mkdir()
    for name in ("rgb", "dsm"):
        (single / f"{name}.png").write_bytes((tmp_path / "in" / name / "b.png").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = predict(_predict_cfg(sgma_ckpt, single, tmp_path / "out1", "pattern=rgb+dsm"))
    assert one["files"]["prediction"] == tmp_path / "out1" / "prediction.png" and "classes" in one
    assert (
        np.asarray(Image.open(out / "b" / "prediction.png")) == np.asarray(Image.open(one["files"]["prediction"]))
    ).all()

    # collisions are checked for every scene before any runs: b's output alone blocks the whole run
    (out / "a" / "prediction.tif").unlink()
    (out / "a").rmdir()
    with pytest.raises(FileExistsError, match=r"already holds b/prediction.png .*overwrite=true"):
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, "pattern=rgb+dsm"))
    assert not (out / "a").exists()
    (out / "a").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"where scene folders go: a"):
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, "pattern=rgb+dsm", "overwrite=true"))


def test_predict_folder_of_scenes_checks_before_running(sgma_ckpt, tmp_path):
    """Missing rasters are all listed before anything runs; a scene failing midway names what was written."""
    import shutil

    _batch_tree(tmp_path / "in", stems=("a", "b", "c"), dsm_stems=("a",))
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"2 raster\(s\) missing for the scenes of rgb/: dsm/b\.\*, dsm/c\.\*"):
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, "pattern=rgb+dsm"))
    assert list(out.iterdir()) == []
    shutil.rmtree(tmp_path / "in" / "dsm")  # no dsm/ folder at all
    with pytest.raises(FileNotFoundError, match=r"none for dsm: .*pattern=rgb"):
        predict(_predict_cfg(sgma_ckpt, tmp_path / "in", out, "pattern=rgb+dsm"))

    _batch_tree(tmp_path / "in2", stems=("a", "b", "c"))
    write_geotiff(tmp_path / "in2" / "dsm" / "b.tif", np.full((1, 40, 50), np.nan, np.float32))  # no valid pixel
    (tmp_path / "in2" / "dsm" / "b.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"scene 2/3 'b' failed .*'dsm' has no valid pixel") as err:
            predict(_predict_cfg(sgma_ckpt, tmp_path / "in2", out, "pattern=rgb+dsm"))
    assert "1 scene(s) were written completely" in str(err.value) and "not predicted: 1 scene(s) (c)" in str(err.value)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a", "a/prediction.tif"]


def test_find_scenes_layouts(tmp_path):
    from sgma.inference import find_scenes

    _batch_tree(tmp_path, stems=("a", "b"))
    scenes = find_scenes(tmp_path, ["rgb", "dsm"])
    assert {s: {m: p.name for m, p in f.items()} for s, f in scenes.items()} == {
        "a": {"rgb": "a.tif", "dsm": "a.tif"},
        "b": {"rgb": "b.png", "dsm": "b.png"},
    }
    write_geotiff(tmp_path / "rgb.tif", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"both modality rasters \(rgb.tif\) and modality folders \(rgb/, dsm/\)"):
        find_scenes(tmp_path, ["rgb", "dsm"])
    assert list(find_scenes(tmp_path / "rgb", ["a"])) == [None]  # a folder of <modality>.tif: one scene
    with pytest.raises(FileNotFoundError, match=r"neither rasters nor folders .*sar.* holds .*labels/.*Accepted"):
        find_scenes(tmp_path, ["sar"])
    write_geotiff(tmp_path / "dsm" / "a.png", np.zeros((1, 8, 8), np.uint8))
    (tmp_path / "rgb.tif").unlink()
    with pytest.raises(ValueError, match=r"several rasters for scene 'a' \(a.png, a.tif\)"):
        find_scenes(tmp_path, ["rgb", "dsm"])


def test_find_scenes_names_files_it_cannot_read(tmp_path, caplog):
    """A scene in another format (rgb/d.webp) is named with the supported formats; a raster's companions are not."""
    from PIL import Image

    from sgma.inference import find_scenes

    _batch_tree(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb" / "d.webp")
    (tmp_path / "rgb" / "a.tif.aux.xml").write_text("<PAMDataset/>")  # GDAL's sidecar of a.tif
    (tmp_path / "dsm" / "b.pgw").write_text("1\n0\n0\n-1\n0\n0\n")  # b.png's world file
    with caplog.at_level("WARNING", logger="sgma"):
        assert list(find_scenes(tmp_path, ["rgb", "dsm"])) == ["a", "b"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "rgb/ has 1 file(s) that are not in a raster format predict reads, ignored: d.webp. Supported: .tif, .tiff, "
        ".png, .jpg, .jpeg; convert the others to predict them (e.g. gdal_translate -of GTiff d.webp d.tif)"
    ]


def test_read_inputs_applies_the_training_transform(tmp_path):
    """sar_to_db on the raw values; NaN and inf stay, and the file's nodata mask still marks its pixels."""
    from sgma.data.preprocess import sar_to_db
    from sgma.inference import fill_invalid, read_inputs

    rng = np.random.default_rng(3)
    linear = rng.uniform(0.0, 2.0, (1, 20, 30)).astype(np.float32)
    linear[0, 0, :4] = [0.0, np.nan, np.inf, -5.0]  # no return, NaN, inf, the nodata value
    write_geotiff(tmp_path / "sar.tif", linear, nodata=-5.0)
    sar = Modality("sar", 1, (-12.0,), (5.0,))
    spec = {"name": "sar_to_db", "low": -25.0, "high": 0.0}
    arrays, _, masks = read_inputs({"sar": tmp_path / "sar.tif"}, [sar], {"sar": spec})
    by_hand = sar_to_db(linear)
    x = arrays["sar"]
    finite = np.isfinite(linear)
    assert np.array_equal(x[finite], by_hand[finite]) and x[finite].min() >= -25 and x[finite].max() <= 0
    assert np.isnan(x[0, 0, 1]) and np.isinf(x[0, 0, 2]) and x[0, 0, 0] == -25.0
    assert masks["sar"][0, 0, 3] and int(masks["sar"].sum()) == 1
    filled, invalid, counts = fill_invalid(arrays, [sar], masks)
    assert counts["sar"] == {"nan": 1, "inf": 1, "nodata": 1, "pixels": 3}
    assert (filled["sar"][0, 0, 1:4] == -12.0).all() and int(invalid.sum()) == 3
    raw, _, _ = read_inputs({"sar": tmp_path / "sar.tif"}, [sar])  # no transform: the raw values
    assert np.array_equal(raw["sar"][finite], linear[finite])


def test_predict_applies_the_stored_transform(sgma_ckpt, tmp_path, caplog):
    """A transform in the checkpoint's facts: predicting raw values = predicting hand-transformed ones without it
    (compared on the float robustness maps, which follow the network's inputs closely)."""
    import rasterio

    from sgma.data.preprocess import sar_to_db

    ckpt = torch.load(sgma_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["sgma"]["dataset"]["input_transforms"] == {}  # train.py stores the key (synthetic: none)
    ckpt["sgma"]["dataset"]["input_transforms"] = {"dsm": {"name": "sar_to_db", "low": -25.0, "high": 0.0}}
    torch.save(ckpt, tmp_path / "db.ckpt")
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    linear = rng.uniform(0.001, 1.0, (1, 40, 50)).astype(np.float32)
    for folder, dsm in (("raw", linear), ("db", sar_to_db(linear))):
        write_geotiff(tmp_path / folder / "rgb.tif", rgb)
        write_geotiff(tmp_path / folder / "dsm.tif", dsm)
    args = ("pattern=rgb+dsm", "robustness=true")
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="sgma"):
        warnings.simplefilter("ignore")
        raw = predict(_predict_cfg(tmp_path / "db.ckpt", tmp_path / "raw", tmp_path / "o1", *args))
        by_hand = predict(_predict_cfg(sgma_ckpt, tmp_path / "db", tmp_path / "o2", *args))
        untransformed = predict(_predict_cfg(sgma_ckpt, tmp_path / "raw", tmp_path / "o3", *args))
    maps = {}
    for name, result in (("raw", raw), ("by_hand", by_hand), ("untransformed", untransformed)):
        with rasterio.open(result["files"]["robustness"]) as src:
            maps[name] = src.read()
    assert np.array_equal(raw["classes"], by_hand["classes"]) and np.array_equal(maps["raw"], maps["by_hand"])
    assert not np.allclose(maps["raw"], maps["untransformed"], atol=1e-4)  # the transform does reach the network
    logged = [r.getMessage() for r in caplog.records if "transformed as in training" in r.getMessage()]
    assert logged == ["raw input values are transformed as in training: dsm: sar_to_db(low=-25.0, high=0.0)"]


def test_dataset_facts_store_the_input_transforms():
    from sgma.builders import build_datamodule
    from sgma.tasks import dataset_facts

    dm = build_datamodule(compose_config("train", ["debug=tiny"]))
    assert dataset_facts(dm)["input_transforms"] == {}  # a dataset without the attribute: none
    base = dm.dataset("train").base
    base.input_transforms = {"dsm": {"name": "sar_to_db", "low": np.float32(-25.0), "high": 0.0}}
    stored = dataset_facts(dm)["input_transforms"]
    assert stored == {"dsm": {"name": "sar_to_db", "low": -25.0, "high": 0.0}} and type(stored["dsm"]["low"]) is float
    base.input_transforms = {"dsm": {"name": "log1p"}}
    with pytest.raises(ValueError, match=r"input_transforms\['dsm'\] names 'log1p'"):
        dataset_facts(dm)
