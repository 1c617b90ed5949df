"""Training data (`bigseg.train.data`, `bigseg.train.device_data`): windows of raster scenes equal crops
of the whole, labels warped and rasterised per window, nodata and areas of interest ignored, splits
without shared pixels, samplers, bounded memory, clear refusals, and the on-device copy of a data
set that trains like the workers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from bigseg.errors import DatasetError, TrainingError
from bigseg.tiling.geometry import Window
from bigseg.train.data import (
    IGNORE,
    DataSet,
    DataSettings,
    ReadSettings,
    SplitSettings,
    open_split,
    DataSplit,
    ImageSource,
    Patch,
    Region,
)
from bigseg.train.data.split import block_split
from bigseg.train.device_data import DeviceData
from bigseg.train.transforms import Augment, augment, sample_rng
from tests.cli_helpers import run_cli
from tests.conftest import TINY, make_generic_dataset, write_geotiff


# --- Raster scenes as training data: windows equal crops of the whole, labels warped and rasterised per
# window as they would be whole, ignore where there is no data, splits that do not leak, clear errors for bad
# inputs, bounded memory, and a 4-band model that predicts with its own statistics.


CRS = "EPSG:32633"


ORIGIN = (500000.0, 4000000.0)


MODEL_CONFIG = "spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8"


def write_labels(path, label, crs=CRS, transform=None, nodata=255, colormap=None):
    profile = dict(driver="GTiff", width=label.shape[1], height=label.shape[0], count=1, dtype=label.dtype.name,
                   crs=crs, transform=transform or from_origin(*ORIGIN, 0.5, 0.5), nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(label, 1)
        if colormap:
            dst.write_colormap(1, colormap)
    return path


def classes_csv(path, names=("water", "field", "road")):
    path.write_text("value,name,red,green,blue\n" + "".join(
        f"{v},{n},{40 * v},{200 - 40 * v},90\n" for v, n in enumerate(names)) + "255,unlabelled,0,0,0\n")
    return path


def learnable_scene(folder, name, width, height, seed=0, count=3, crs=CRS, nodata=None):
    """An image whose bands tell the class (three classes in stripes and blocks) and its labels."""
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), np.uint8)
    label[:, width // 3:] = 1
    label[height // 2:, : width // 2] = 2
    label = np.roll(label, int(rng.integers(0, width)), 1)
    colours = np.array([[200, 40, 40, 90], [40, 200, 40, 160], [40, 40, 200, 230]], np.uint8)[:, :count]
    image = (colours[label] + rng.integers(0, 30, (height, width, count))).astype(np.uint8).transpose(2, 0, 1)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    extra = {} if count == 3 else {"photometric": "minisblack"}  # four bands of data (RGBN), not RGB + alpha
    write_geotiff(folder / "images" / f"{name}.tif", width, height, count, data=image, crs=crs, nodata=nodata, **extra)
    write_labels(folder / "labels" / f"{name}.tif", label, crs=crs)
    return image, label


def test_a_window_read_equals_the_same_crop_of_the_whole_image_and_label(tmp_path):
    image, label = learnable_scene(tmp_path, "a", 300, 200)
    learnable_scene(tmp_path, "b", 120, 100, seed=1)
    classes_csv(tmp_path / "classes.csv")
    source = open_split(tmp_path, "train").source
    whole = source.read(0)
    assert np.array_equal(whole.image, image) and np.array_equal(whole.label, label) and whole.image.dtype == np.uint8
    for window in (Window(0, 0, 300, 200), Window(17, 33, 101, 77), Window(250, 150, 50, 50)):
        patch = source.read(0, window)
        assert np.array_equal(patch.image, whole.image[(slice(None), *window.slices)])
        assert np.array_equal(patch.label, whole.label[window.slices])
        assert np.array_equal(source.read_label(0, window), whole.label[window.slices])


def test_a_label_raster_in_another_crs_and_resolution_is_warped_onto_the_image_grid(tmp_path):
    """Labels in EPSG:4326 at another resolution: each window's nearest-neighbour warp equals the
    label value at each image pixel's centre, looked up in the label raster."""
    from rasterio.warp import transform as transform_points

    w, h = 160, 120
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    write_geotiff(tmp_path / "images" / "a.tif", w, h, 3)
    # a label grid in degrees that covers the image with margin, about 0.7 m pixels, irregular content
    left, bottom, right, top = rasterio.open(tmp_path / "images" / "a.tif").bounds
    xs, ys = transform_points(CRS, "EPSG:4326", [left, right, left, right], [bottom, bottom, top, top])
    res = 0.7 / 111000
    lt = from_origin(min(xs) - 20 * res, max(ys) + 20 * res, res, res)
    lw, lh = int((max(xs) - min(xs)) / res) + 40, int((max(ys) - min(ys)) / res) + 40
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 3, (lh // 7 + 1, lw // 7 + 1)).astype(np.uint8)
    labels = np.kron(coarse, np.ones((7, 7), np.uint8))[:lh, :lw]
    write_labels(tmp_path / "labels" / "a.tif", labels, crs="EPSG:4326", transform=lt)
    classes_csv(tmp_path / "classes.csv")
    source = DataSet(tmp_path).splits.source
    # the truth: each image pixel centre mapped to the label raster, nearest pixel
    t = rasterio.open(tmp_path / "images" / "a.tif").transform
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    px, py = t * (cols.ravel(), rows.ravel())
    lon, lat = transform_points(CRS, "EPSG:4326", px, py)
    lc, lr = ~lt * (np.array(lon), np.array(lat))
    truth = labels[np.floor(lr).astype(int), np.floor(lc).astype(int)].reshape(h, w)
    whole = source.read_label(0)
    assert (whole == truth).mean() > 0.995  # pixel centres exactly on a label pixel's edge may go either way
    for window in (Window(10, 20, 64, 48), Window(100, 70, 60, 50)):
        assert np.array_equal(source.read_label(0, window), whole[window.slices])


def test_vector_labels_rasterised_per_window_equal_a_whole_raster_rasterisation(tmp_path):
    import shapely
    from rasterio.features import rasterize

    (tmp_path / "images").mkdir()
    write_geotiff(tmp_path / "images" / "a.tif", 200, 160, 3)
    x0, y0 = ORIGIN
    polygons = [shapely.Point(x0 + 30, y0 - 30).buffer(18), shapely.box(x0 + 50, y0 - 75, x0 + 95, y0 - 40),
                shapely.Polygon([(x0 + 10, y0 - 70), (x0 + 60, y0 - 55), (x0 + 20, y0 - 78)]),
                shapely.box(x0 + 52, y0 - 10, x0 + 99, y0 - 2).difference(shapely.box(x0 + 60, y0 - 8, x0 + 70, y0 - 4))]
    kinds = ["house", "pool", "house", "pool"]
    write_vector(tmp_path / "labels.gpkg", polygons, {"kind": kinds}, CRS)
    source = DataSet(tmp_path, DataSettings(ReadSettings(class_field="kind"))).splits.source
    assert source.classes == ["background", "house", "pool"]
    t = rasterio.open(tmp_path / "images" / "a.tif").transform
    codes = {"house": 1, "pool": 2}
    truth = rasterize(zip(polygons, [codes[k] for k in kinds]), out_shape=(160, 200), transform=t, fill=0,
                      dtype="uint8")
    left, bottom, right, top = shapely.total_bounds(polygons)
    cols, rows = np.meshgrid(np.arange(200) + 0.5, np.arange(160) + 0.5)
    cx, cy = t * (cols, rows)
    truth[~((cx >= left) & (cx <= right) & (cy >= bottom) & (cy <= top))] = IGNORE  # outside the labels' extent
    assert np.array_equal(source.read_label(0), truth)
    for window in (Window(0, 0, 64, 64), Window(37, 41, 90, 77), Window(150, 100, 50, 60)):
        assert np.array_equal(source.read_label(0, window), truth[window.slices])
    assert any("outside the polygons' extent" in n for n in source.notes)


def write_vector(path, geometries, fields, crs):
    """A vector file of polygons with attribute columns, written by pyogrio (the driver from the suffix)."""
    import shapely
    from pyogrio.raw import write

    data = [np.array(v, object if isinstance(v[0], str) else None) for v in fields.values()]
    write(str(path), shapely.to_wkb(np.array(geometries, object)), data, fields=list(fields),
          geometry_type="Polygon", crs=crs)


def test_nodata_masks_and_the_area_of_interest_become_ignore(tmp_path):
    import shapely

    image, label = learnable_scene(tmp_path, "a", 120, 100)
    learnable_scene(tmp_path, "b", 120, 100, seed=1)
    classes_csv(tmp_path / "classes.csv")
    with rasterio.open(tmp_path / "images" / "a.tif", "r+") as ds:  # an image nodata value in a corner
        ds.nodata = 0
        data = ds.read()
        data[:, :10, :10] = 0
        ds.write(data)
    with rasterio.open(tmp_path / "labels" / "a.tif", "r+") as ds:  # the label's own nodata elsewhere
        lab = ds.read(1)
        lab[90:, 100:] = 255
        ds.write(lab, 1)
    x0, y0 = ORIGIN
    aoi = shapely.box(x0, y0 - 45, x0 + 55, y0)  # the upper-left 110 x 90 pixels
    write_vector(tmp_path / "aoi.geojson", [aoi], {"id": [1]}, CRS)
    (tmp_path / "scenes.csv").write_text("image,labels,split,aoi\nimages/a.tif,labels/a.tif,train,aoi.geojson\n"
                                         "images/b.tif,labels/b.tif,val,\n")
    source = open_split(tmp_path / "scenes.csv", "train").source
    patch = source.read(0)
    assert (patch.label[:10, :10] == IGNORE).all() and not patch.valid[:10, :10].any()
    assert (patch.label[90:, 100:] == IGNORE).all()
    assert (patch.label[:, 110:] == IGNORE).all() and (patch.label[90:, :] == IGNORE).all()
    inside = np.zeros_like(label, bool)
    inside[:90, :110] = True
    inside[:10, :10] = False
    assert np.array_equal(patch.label[inside], label[inside])
    assert open_split(tmp_path / "scenes.csv", "val").regions[0].item == 1


def test_the_spatial_split_of_one_scene_has_no_pixel_in_both_sides_and_windows_stay_in_training_blocks(tmp_path):
    from bigseg.train.data import RandomWindows
    from bigseg.train.transforms import sample_rng

    regions = block_split(3000, 2100, 512, 64)
    train_mask = np.zeros((2100, 3000), np.uint8)
    val_mask = np.zeros((2100, 3000), np.uint8)
    for r in regions["train"]:
        train_mask[r.window.slices] += 1
    for r in regions["val"]:
        val_mask[r.window.slices] += 1
    assert train_mask.max() == 1 and val_mask.max() == 1 and not (train_mask & val_mask).any()
    assert len(regions["val"]) == 6 * 5 // 5  # one block in five
    # every training pixel is at least the buffer away from every validation pixel (Chebyshev distance)
    import cv2
    near_val = cv2.dilate(val_mask, np.ones((2 * 64 - 1, 2 * 64 - 1), np.uint8))
    assert not (near_val & train_mask).any()

    learnable_scene(tmp_path, "one", 700, 600)
    classes_csv(tmp_path / "classes.csv")
    data = DataSet(tmp_path, DataSettings(split=SplitSettings(block=256, buffer=32)))
    train, val = data.split("train"), data.split("val")
    assert data.check_disjoint(train, val) and "one scene: validation on" in data.notes[-1]
    sampler = RandomWindows(data.splits.source, train.regions, 50)
    for k in range(50):
        _, window, _ = sampler.draw(sample_rng(0, 0, k), 96, 0.5, 2.0)
        assert any(r.window.col_off <= window.col_off and window.col_end <= r.window.col_end
                   and r.window.row_off <= window.row_off and window.row_end <= r.window.row_end
                   for r in train.regions), window


def test_rare_class_sampling_centres_windows_on_the_rare_class_and_says_how_often(tmp_path):
    from bigseg.train.config import TrainConfig
    from bigseg.train.data import RandomWindows
    from bigseg.train.setup import open_data
    from bigseg.train.transforms import sample_rng

    for name, seed in (("a", 0), ("b", 1)):
        label = np.zeros((400, 500), np.uint8)
        label[:, 250:] = 1
        if name == "a":
            label[350:390, 10:50] = 2  # 0.4% of the pixels, in one corner of one scene
        image = np.stack([label * 80 + 20] * 3).astype(np.uint8)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        write_geotiff(tmp_path / "images" / f"{name}.tif", 500, 400, 3, data=image, crs=CRS)
        write_labels(tmp_path / "labels" / f"{name}.tif", label)
    classes_csv(tmp_path / "classes.csv")
    train = DataSet(tmp_path).split("train")

    def rare_share(sampler, n=400):
        hits = 0
        for k in range(n):
            item, window, _ = sampler.draw(sample_rng(0, 0, k), 64, 1.0, 1.0)
            hits += bool((train.source.read_label(item, window) == 2).any())
        return hits / n

    by_area = RandomWindows(train.source, train.regions, 400)
    rare = RandomWindows(train.source, train.regions, 400, 1, 0.1, 3)
    assert by_area.class_probabilities is None
    # shares 49.8%, 49.8%, 0.4%: exp((1 - share) / 0.1) gives the rare class about 99%
    assert rare.class_probabilities[2] > 0.98 and rare.class_probabilities.sum() == pytest.approx(1)
    assert rare_share(by_area) < 0.05 and rare_share(rare) > 0.9
    first = rare.draw(sample_rng(5, 1, 7), 64, 0.5, 2.0)
    assert rare.draw(sample_rng(5, 1, 7), 64, 0.5, 2.0) == first  # a sample's choices are its seed's
    # a high temperature draws the classes nearly evenly
    even = RandomWindows(train.source, train.regions, 400, 1, 10.0, 3).class_probabilities
    assert np.allclose(even, 1 / 3, atol=0.02)

    data = open_data(TrainConfig(data=str(tmp_path), run_dir=str(tmp_path / "run"), rare_class_sampling=0.1,
                                 batch_size=2, crop=64))
    assert any(n.startswith("rare-class sampling: windows centred on water 1%, field 1%, road 99%") for n in data.notes)


def test_scene_balance_draws_a_small_scene_as_often_as_a_large_one_and_says_so(tmp_path):
    from bigseg.train.config import TrainConfig
    from bigseg.train.data import RandomWindows
    from bigseg.train.setup import open_data
    from bigseg.train.transforms import sample_rng

    learnable_scene(tmp_path, "large", 500, 400)
    learnable_scene(tmp_path, "small", 100, 80, seed=1)  # 25 times fewer pixels
    learnable_scene(tmp_path, "held", 64, 64, seed=2)
    classes_csv(tmp_path / "classes.csv")
    train = DataSet(tmp_path, DataSettings(split=SplitSettings(("held",)))).split("train")
    small = next(r.item for r in train.regions if train.source.item_id(r.item).endswith("small.tif"))

    def small_share(sampler, n=600):
        return np.mean([sampler.draw(sample_rng(0, 0, k), 32, 1.0, 1.0)[0] == small for k in range(n)])

    shares = {}
    for balance in (0.0, 0.5, 1.0):
        sampler = RandomWindows(train.source, train.regions, 10, scene_balance=balance)
        shares[balance] = sampler.scene_shares()[small]
        assert small_share(sampler) == pytest.approx(shares[balance], abs=0.04)
    # area ratio 25: by area 1/26, by its square root 1/6, alike 1/2
    assert shares[0.0] == pytest.approx(1 / 26) and shares[0.5] == pytest.approx(1 / 6) and shares[1.0] == pytest.approx(1 / 2)
    rare = RandomWindows(train.source, train.regions, 10, 1, 10.0, 3, scene_balance=1.0)  # with rare classes too
    assert small_share(rare) > 0.4
    data = open_data(TrainConfig(data=str(tmp_path), run_dir=str(tmp_path / "run"), scene_balance=1.0,
                                 batch_size=2, crop=32, val_scenes=("held",)))
    assert "scene balance 1: windows from large 50%, small 50%" in data.notes


def test_an_unknown_label_value_is_an_error_naming_it_and_the_file(tmp_path):
    image, label = learnable_scene(tmp_path, "a", 80, 60)
    learnable_scene(tmp_path, "b", 80, 60, seed=1)
    classes_csv(tmp_path / "classes.csv", names=("water", "field"))  # no value 2
    with pytest.raises(DatasetError, match=r"labels/(a|b)\.tif: label value 2 is in no class table"):
        DataSet(tmp_path).split("train").source.read_label(0)
    # without any table, the classes are the values found, coloured by the label's colour table
    (tmp_path / "classes.csv").unlink()
    with rasterio.open(tmp_path / "labels" / "a.tif", "r+") as ds:
        ds.write_colormap(1, {0: (10, 20, 30), 1: (40, 50, 60), 2: (70, 80, 90)})
    data = DataSet(tmp_path)
    assert data.splits.source.classes == ["class 0", "class 1", "class 2"]
    assert data.splits.source.palette[2] == [70, 80, 90] and "no classes.csv" in data.notes[0]
    # and named by the category names GIS tools keep beside a class raster (as bigseg writes its masks)
    from bigseg.io.writers import write_class_styles

    write_class_styles(tmp_path / "labels" / "a.tif", ["sea", "sand", "road"], [[0, 0, 255], [9, 9, 9], [5, 5, 5]])
    assert DataSet(tmp_path).splits.source.classes == ["sea", "sand", "road"]


@pytest.mark.parametrize("case", ["no overlap", "no class field", "crs-less vector", "size without georeference"])
@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_bad_inputs_are_one_line_and_leave_nothing_a_resume_would_trust(tmp_path, capsys, case):
    import shapely

    data = tmp_path / "data"
    learnable_scene(data, "a", 96, 80)
    classes_csv(data / "classes.csv")
    if case == "no overlap":
        far = from_origin(ORIGIN[0] + 10000, ORIGIN[1], 0.5, 0.5)
        write_labels(data / "labels" / "a.tif", np.zeros((80, 96), np.uint8), transform=far)
        expect = "does not overlap its image"
    elif case == "size without georeference":
        (data / "images" / "a.tif").unlink()
        _plain_tiff(data / "images" / "a.tif", 96, 80)
        _plain_tiff(data / "labels" / "a.tif", 48, 40, count=1)
        expect = "without georeferencing on both they cannot be aligned"
    else:
        for f in (data / "labels").iterdir():
            f.unlink()
        (data / "labels").rmdir()
        x0, y0 = ORIGIN
        write_vector(data / "labels.gpkg", [shapely.box(x0 + 5, y0 - 30, x0 + 40, y0 - 5)], {"kind": ["water"]},
               None if case == "crs-less vector" else CRS)
        expect = ("has no field 'class'" if case == "no class field" else
                  "has no CRS and its image is georeferenced")
    args = ["train", "--data", data, "--run", tmp_path / "run", "--device", "cpu", "--crop", "64", "--batch-size", "2",
            "--workers", "0", "--model-config", MODEL_CONFIG]
    if case in ("no class field", "crs-less vector"):
        args += ["--class-field", "class" if case == "no class field" else "kind"]
    code, _, err = run_cli(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and expect in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def _plain_tiff(path, width, height, count=3):
    """A TIFF without georeferencing (pixel grid only), as the Dubai mosaics are."""
    import tifffile

    data = np.random.default_rng(0).integers(0, 3, (height, width, count) if count > 1 else (height, width))
    tifffile.imwrite(path, data.astype(np.uint8))


def test_peak_memory_training_on_a_large_sparse_raster_does_not_grow_with_its_size(tmp_path):
    """Mostly empty (sparse) GeoTIFF scenes 16x the area of others with the same labelled patch:
    setting up, training a few steps and validating on a whole scene keep the same peak memory
    (nothing reads a whole raster)."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        import numpy as np, rasterio
        from rasterio.transform import from_origin
        from bigseg.train.loop import TrainConfig, train
        side, root = int(sys.argv[1]), sys.argv[2]
        import pathlib; root = pathlib.Path(root); (root / "images").mkdir(parents=True); (root / "labels").mkdir()
        t = from_origin(500000.0, 4000000.0, 0.5, 0.5)
        common = dict(width=side, height=side, crs="EPSG:32633", transform=t, tiled=True, blockxsize=256,
                      blockysize=256, compress="deflate", sparse_ok=True, driver="GTiff")
        for name in ("a", "b"):
            with rasterio.open(root / "images" / f"{{name}}.tif", "w", count=3, dtype="uint8", nodata=0, **common) as ds:
                ds.write(np.full((3, 512, 512), 100 + 50 * (name == "b"), np.uint8),
                         window=rasterio.windows.Window(256, 256, 512, 512))
            with rasterio.open(root / "labels" / f"{{name}}.tif", "w", count=1, dtype="uint8", nodata=255, **common) as ds:
                lab = np.zeros((512, 512), np.uint8); lab[:, 256:] = 1
                ds.write(lab, 1, window=rasterio.windows.Window(256, 256, 512, 512))
        (root / "classes.csv").write_text("value,name\\n0,a\\n1,b\\n")
        train(TrainConfig(data=str(root), run_dir=str(root / "run"), arch_config=json.loads({json.dumps(json.dumps(TINY))}),
                          epochs=1, batch_size=2, crop=64, workers=0, device="cpu", precision="fp32",
                          eval_every=1, val_tile=256, windows_per_epoch=4))
        print("PEAK", int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))
    """)
    peaks = {}
    for side in (4096, 16384):
        out = subprocess.run([sys.executable, "-c", script, str(side), str(tmp_path / str(side))],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[side] = int(out.stdout.split("PEAK")[-1]) / 1024  # MiB
    # a whole 16384^2 x 3 raster would be 768 MiB; its coverage map and label pass stay bounded
    assert peaks[16384] < peaks[4096] + 64, peaks


def test_a_run_from_init_keeps_the_normalisation_its_weights_were_trained_with(tmp_path, capsys, monkeypatch):
    """Band statistics are estimated from random windows, so another seed estimates others: a
    fine-tune from --init must feed its weights inputs normalised as they were trained."""
    from bigseg.checkpoint import load_checkpoint
    from bigseg.train.config import TrainConfig
    from bigseg.train.setup import band_statistics, open_data

    monkeypatch.setattr("bigseg.train.setup.STATISTICS_SIDE", 32)  # windows smaller than the scenes

    data = tmp_path / "data"
    learnable_scene(data, "a", 160, 128)
    learnable_scene(data, "b", 160, 128, seed=1)
    classes_csv(data / "classes.csv")
    common = ["--data", data, "--device", "cpu", "--crop", "64", "--batch-size", "4", "--workers", "0",
              "--epochs", "1", "--windows-per-epoch", "8", "--model-config", MODEL_CONFIG, "--eval-every", "0"]
    runs = {}
    for name, extra in (("first", ["--seed", "1"]), ("fine-tune", ["--seed", "2", "--init", tmp_path / "first" / "final.pt"])):
        code, _, err = run_cli(capsys, "train", "--run", tmp_path / name, *common, *extra)
        assert code == 0, err
        runs[name] = load_checkpoint(tmp_path / name / "final.pt").normalization
    # what a new run with the fine-tune's seed estimates: other windows, other statistics
    fresh = band_statistics(open_data(TrainConfig(data=str(data), run_dir=str(tmp_path / "x"), crop=64,
                                                  batch_size=4, windows_per_epoch=8)), 2)
    assert fresh["mean"] != runs["first"].mean
    assert (runs["fine-tune"].mean, runs["fine-tune"].std) == (runs["first"].mean, runs["first"].std)


def test_a_model_trained_on_four_bands_predicts_four_band_input_with_its_stored_statistics(tmp_path, capsys):
    from bigseg.checkpoint import load_checkpoint

    data = tmp_path / "data"
    learnable_scene(data, "a", 160, 128, count=4)
    learnable_scene(data, "b", 160, 128, seed=1, count=4)
    classes_csv(data / "classes.csv")
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--device", "cpu", "--crop", "64",
                           "--batch-size", "4", "--workers", "0", "--epochs", "1", "--windows-per-epoch", "8",
                           "--lr", "3e-3", "--model-config", MODEL_CONFIG)
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt.in_channels == 4 and ckpt.input["bands"] == [1, 2, 3, 4] and ckpt.input["pixel_size"] == [0.5, 0.5]
    assert ckpt.input["units"] == "metre" and ckpt.input["label_values"] == [0, 1, 2]
    described = json.loads((tmp_path / "run" / "data.json").read_text())
    assert described["prepared"]["normalization"]["mean"] == ckpt.normalization.mean
    # the fourth band's statistics are its own (values 90..260 clipped, not ImageNet's)
    assert 100 < ckpt.normalization.mean[3] < 255 and len(ckpt.normalization.std) == 4
    out = tmp_path / "a.mask.tif"
    code, _, err = run_cli(capsys, "predict", data / "images" / "a.tif", "--model", tmp_path / "run" / "best.pt",
                           "-o", out, "--device", "cpu")
    assert code == 0, err
    with rasterio.open(out) as ds:
        mask = ds.read(1)
    # predict read all four bands and normalised them with the stored statistics: the model's own
    # forward pass on the four bands, normalised by hand, gives the same labels
    import torch

    image = rasterio.open(data / "images" / "a.tif").read().astype(np.float32)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (ckpt.normalization.mean, ckpt.normalization.std))
    with torch.no_grad():
        logits = ckpt.build_model()((torch.from_numpy(image)[None] - mean) / std)
    assert (logits[0].argmax(0).numpy() == mask).mean() > 0.999


def test_a_data_worker_forked_after_a_read_opens_its_own_files(tmp_path):
    """The main process reads scenes (validation, statistics) before each epoch's workers are forked:
    a worker reading through the parent's file descriptors would move its file offsets."""
    import os

    learnable_scene(tmp_path, "a", 96, 80)
    learnable_scene(tmp_path, "b", 96, 80, seed=1)
    classes_csv(tmp_path / "classes.csv")
    source = DataSet(tmp_path).splits.source
    parent_reader = source.reader(0)
    parent_labels = source.labels[0]._source()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its own reader and label dataset, the same pixels
        ok = source.reader(0) is not parent_reader and source.labels[0]._source() is not parent_labels
        ok &= np.array_equal(source.read(0).label, source.read_label(0))
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert source.reader(0) is parent_reader  # the parent keeps its own


def test_eval_scores_each_scene_and_the_whole_split_through_the_tiled_predictor(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "data"
    for i, name in enumerate(("a", "b", "c")):
        learnable_scene(data, name, 140, 100, seed=i)
    classes_csv(data / "classes.csv", names=("sky", "road", "car"))  # the tiny checkpoint's three classes
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", tiny_checkpoint, "--split", "all",
                             "--device", "cpu", "--tile", "64", "-o", tmp_path / "e.json")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert sorted(report["scenes"]) == ["a", "b", "c"] and report["images"] == 3
    assert sum(s["pixels"] for s in report["scenes"].values()) == report["pixels"] == 3 * 140 * 100
    # the overall confusion matrix is the sum of the scenes' (their IoUs recomputed from it agree)
    from bigseg.metrics import scores
    conf = np.array(report["confusion"])
    assert scores(conf, ["sky", "road", "car"])["miou"] == pytest.approx(report["miou"])
    assert "a: mIoU" in out and "mIoU" in out.splitlines()[-1]
    # the same model and tiles through predict give the labels eval scored
    code, _, err = run_cli(capsys, "predict", data / "images" / "b.tif", "--model", tiny_checkpoint, "-o",
                           tmp_path / "b.mask.tif", "--device", "cpu", "--tile", "64")
    assert code == 0, err
    pred = rasterio.open(tmp_path / "b.mask.tif").read(1)
    truth = rasterio.open(data / "labels" / "b.tif").read(1)
    conf_b = np.bincount(truth.ravel().astype(int) * 3 + pred.ravel(), minlength=9).reshape(3, 3)
    assert scores(conf_b, ["sky", "road", "car"])["miou"] == pytest.approx(report["scenes"]["b"]["miou"])


def test_real_spacenet_buildings_from_geojson_and_a_road_mask_in_epsg4326(shared_data, tmp_path):
    import pyogrio
    import shapely

    spacenet = shared_data / "aerial" / "spacenet"
    (tmp_path / "scenes.csv").write_text(
        f"image,labels\n{spacenet / 'sample_geotiff.tif'},{spacenet / 'geotiff_labels.geojson'}\n")
    source = open_split(tmp_path / "scenes.csv", "train").source
    assert source.classes == ["background", "geotiff_labels"] and source.channels == 1
    label = source.read_label(0)
    valid = source.reader(0).validity(Window(0, 0, 900, 900))
    polygons = shapely.from_wkb(pyogrio.raw.read(spacenet / "geotiff_labels.geojson")[2])
    footprint = shapely.union_all(polygons).intersection(shapely.box(733601.0, 3724689.0, 734051.0, 3725139.0)).area
    building = (label == 1).sum() * 0.25  # 0.5 m pixels
    assert building == pytest.approx(footprint, rel=0.03)  # pixel centres against exact areas
    assert ((label == IGNORE) == ~valid).all()  # the image's nodata (0) is the only ignore: labels cover it all
    # a 0/255 road mask on the same EPSG:4326 grid as its 16-bit image
    (tmp_path / "roads.csv").write_text(
        f"image,labels\n{spacenet / 'road_mask_input.tif'},{spacenet / 'sample_road_raster_mask.tif'}\n")
    roads = DataSet(tmp_path / "roads.csv")
    assert roads.splits.source.classes == ["class 0", "class 255"]  # a 0/255 mask: two classes, not one and ignore
    patch = roads.splits.source.read(0, Window(300, 300, 256, 256))
    assert patch.image.dtype == np.float32 and patch.image.max() <= 255  # 16-bit rescaled as predict rescales


def test_predict_reads_the_bands_the_model_was_trained_on_and_notes_another_pixel_size(tmp_path, capsys):
    data = tmp_path / "data"
    learnable_scene(data, "a", 128, 96, count=4)
    learnable_scene(data, "b", 128, 96, seed=1, count=4)
    classes_csv(data / "classes.csv")
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--device", "cpu", "--crop", "64",
                           "--batch-size", "2", "--workers", "0", "--epochs", "1", "--windows-per-epoch", "2",
                           "--bands", "4,2,1", "--eval-every", "0", "--model-config", MODEL_CONFIG)
    assert code == 0, err
    from bigseg.checkpoint import load_checkpoint
    from bigseg.io.readers import ReadOptions
    from bigseg.run.inputs import open_for_model

    model = tmp_path / "run" / "best.pt"
    ckpt = load_checkpoint(model)
    assert ckpt.input["bands"] == [4, 2, 1] and ckpt.in_channels == 3
    with open_for_model(data / "images" / "a.tif", ckpt, ReadOptions()) as reader:
        assert reader.plan.indexes == (4, 2, 1)  # the model's bands, not the first three
    with open_for_model(data / "images" / "a.tif", ckpt, ReadOptions(bands=(1, 2, 3))) as reader:
        assert reader.plan.indexes == (1, 2, 3)  # the user's choice wins
    common = ["--model", model, "--device", "cpu", "--tile", "64"]
    # the same scene at 2 m pixels: read at the model's 0.5 m and written on its own grid, with a note;
    # with --resolution native as it is, with a warning saying what the model was trained on
    with rasterio.open(data / "images" / "a.tif") as ds:
        profile, pixels = ds.profile, ds.read()
    profile.update(transform=from_origin(*ORIGIN, 2.0, 2.0))
    with rasterio.open(tmp_path / "coarse.tif", "w", **profile) as dst:
        dst.write(pixels)
    code, _, err = run_cli(capsys, "predict", tmp_path / "coarse.tif", "-o", tmp_path / "coarse.mask.tif", *common)
    assert code == 0 and "read at the model's 0.5 metre pixels, resampled from the input's 2 metre" in err, err
    with rasterio.open(tmp_path / "coarse.mask.tif") as ds:
        assert (ds.width, ds.height) == (128, 96) and ds.transform.a == 2.0
    code, _, err = run_cli(capsys, "predict", tmp_path / "coarse.tif", "-o", tmp_path / "native.mask.tif", *common,
                           "--resolution", "native")
    assert code == 0 and "pixels are 2 metre, the model was trained on 0.5 metre" in err
    assert "--resolution model reads it at the model's pixel size" in err


def test_the_batchnorm_probe_scores_a_model_with_recomputed_statistics_and_leaves_its_file(tmp_path, capsys):
    """tools/batchnorm_probe.py, the land-cover card's figures: a score per scene balance."""
    import hashlib
    import re
    from pathlib import Path

    data = tmp_path / "data"
    learnable_scene(data, "a", 160, 128)
    learnable_scene(data, "b", 96, 64, seed=1)
    learnable_scene(data, "c", 128, 128, seed=2)
    classes_csv(data / "classes.csv")
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--device", "cpu", "--crop", "64",
                           "--batch-size", "4", "--workers", "0", "--epochs", "1", "--windows-per-epoch", "8",
                           "--model-config", MODEL_CONFIG, "--val-scenes", "c")
    assert code == 0, err
    model = tmp_path / "run" / "final.pt"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    script = Path(__file__).resolve().parents[1] / "tools" / "batchnorm_probe.py"
    out = subprocess.run([sys.executable, str(script), str(model), str(data), str(tmp_path / "probe"), "0", "1",
                          "--batches", "2", "--crop", "64", "--batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    scores = re.findall(r"scene balance (\S+): val mIoU (\d+\.\d+) \(water \S+, field \S+, road \S+\)", out.stdout)
    assert [b for b, _ in scores] == ["0", "1"] and all(0 <= float(m) <= 100 for _, m in scores), out.stdout
    assert "scene balance 1: windows from a 50%, b 50%" in out.stdout
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_utm_polygons_in_a_geojson_without_a_crs_are_one_line_that_says_the_fix(tmp_path, capsys):
    import shapely

    (tmp_path / "images").mkdir()
    write_geotiff(tmp_path / "images" / "a.tif", 200, 160, 3)
    x0, y0 = ORIGIN
    write_vector(tmp_path / "labels.geojson", [shapely.box(x0 + 50, y0 - 75, x0 + 95, y0 - 40)], {"kind": ["house"]},
                 None)  # UTM metres, and no crs member: GeoJSON says WGS84
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--run", tmp_path / "run", "--max-steps", "1",
                           "--workers", "0", "--crop", "64", "--device", "cpu")
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code != 0 and len(errors) == 1 and "Traceback" not in err and "PROJ" not in err
    assert "look projected" in errors[0] and "declares no CRS" in errors[0] and "ogr2ogr -a_srs" in errors[0]


def test_self_intersecting_polygons_are_repaired_and_counted(tmp_path):
    """A bow-tie ring (invalid) labels both of its triangles, as make_valid splits it, and says so."""
    import shapely

    (tmp_path / "images").mkdir()
    write_geotiff(tmp_path / "images" / "a.tif", 200, 160, 3)
    x0, y0 = ORIGIN
    bowtie = shapely.Polygon([(x0 + 10, y0 - 10), (x0 + 90, y0 - 70), (x0 + 90, y0 - 10), (x0 + 10, y0 - 70)])
    assert not bowtie.is_valid
    write_vector(tmp_path / "labels.gpkg", [bowtie, shapely.box(x0 + 120, y0 - 60, x0 + 180, y0 - 20)],
                 {"kind": ["house", "house"]}, CRS)
    source = DataSet(tmp_path, DataSettings(ReadSettings(class_field="kind"))).splits.source
    assert any("1 invalid polygon(s)" in n and "make_valid" in n for n in source.notes)
    labels = source.read_label(0)
    t = rasterio.open(tmp_path / "images" / "a.tif").transform
    col, row = ~t * (x0 + 25, y0 - 40)   # inside the left triangle of the bow-tie
    col2, row2 = ~t * (x0 + 75, y0 - 40)  # inside the right one
    assert labels[int(row), int(col)] == 1 and labels[int(row2), int(col2)] == 1


# --- Training data on the device: the same augmentation as the worker path, from frames decoded once.


class Frames(ImageSource):
    """Images of textured synthetic frames with thin structures (the cases resampling changes)."""

    channels, name = 3, "frames"

    def __init__(self, n=6, size=(90, 130)):
        rng = np.random.default_rng(0)
        h, w = size
        yy, xx = np.mgrid[:h, :w]
        self.items = []
        for i in range(n):
            image = (rng.integers(0, 256, (h, w, 3)) * 0.3 + 120 + 60 * np.sin(xx / (3 + i))[..., None]).astype(np.uint8)
            label = ((xx // (2 + i) + yy // 7) % 4).astype(np.uint8)
            label[:, (7 * i) % w] = 3  # one-pixel poles
            label[rng.random((h, w)) < 0.02] = IGNORE
            self.items.append((image, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def read(self, i, window=None):
        image, label = self.items[i]
        return Patch(np.ascontiguousarray(image.transpose(2, 0, 1)), label.copy(), np.ones(label.shape, bool))

    def split(self) -> DataSplit:
        return DataSplit(self, [Region(i) for i in range(len(self))], "train")


@pytest.mark.parametrize("scales", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.0)], ids=["same", "enlarged", "shrunk"])
def test_device_augmentation_makes_the_worker_paths_crops(scales):
    frames = Frames()
    data = DeviceData(frames.split(), torch.device("cpu"))
    assert data.nbytes == sum(i.nbytes + lab.nbytes for i, lab in frames.items)
    for jitter, colour, gamma in ((0.0, 0.0, 0.0), (0.3, 0.0, 0.0), (0.3, 0.2, 0.0), (0.3, 0.2, 0.5)):
        aug = Augment(96, *scales, True, jitter, colour, gamma)
        for i in range(len(frames)):
            image, label = augment(*frames[i], aug, sample_rng(4, 2, i))
            x, y = data.sample(i, aug, sample_rng(4, 2, i))
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 96, 96)
            same = (y.numpy() == label).mean()
            diff = np.abs(x.numpy() - image)
            if scales == (1.0, 1.0):
                assert same == 1 and diff.max() < 1e-3  # no resampling: the same pixels
            elif scales[0] >= 1:
                assert same > 0.995 and diff.max() <= 1.5  # OpenCV rounds its bilinear output to 8 bits
            else:
                assert same > 0.995 and diff.mean() < 3  # area averaging vs antialiased bilinear
            assert (y == IGNORE).any() or (label != IGNORE).all()


def test_batches_follow_the_indices_and_drop_the_incomplete_last_batch():
    data = DeviceData(Frames(n=5).split(), torch.device("cpu"))
    aug = Augment(64, 0.75, 1.25, True, 0.0)
    batches = list(data.batches(None, [4, 2, 0, 1, 3], aug, seed=1, epoch=0, batch_size=2))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 64, 64)
    x, y = data.sample(0, aug, sample_rng(1, 0, 0))
    assert torch.equal(batches[1][0][0], x) and torch.equal(batches[1][1][0], y)


def test_a_data_set_too_large_for_the_gpu_is_refused_before_it_is_copied(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20_000, 80_000))
    with pytest.raises(TrainingError, match="without --data-on-device"):
        DeviceData(Frames(n=2).split(), torch.device("cuda"))


def test_colour_jitter_casts_each_channel_and_leaves_the_other_choices_as_they_were():
    from bigseg.train.transforms import draw

    image = np.full((40, 50, 3), 100, np.uint8)
    label = np.zeros((40, 50), np.uint8)
    plain, cast = Augment(32, 0.75, 1.5, True, 0.3), Augment(32, 0.75, 1.5, True, 0.3, 0.25)
    for i in range(20):
        a, b = draw(plain, sample_rng(0, 0, i), 40, 50), draw(cast, sample_rng(0, 0, i), 40, 50)
        assert a.gains is None and (a.scale, a.y, a.x, a.flip, a.jitter) == (b.scale, b.y, b.x, b.flip, b.jitter)
        assert all(0.75 <= g <= 1.25 for g in b.gains)
    x, _ = augment(image, label, Augment(32, 1.0, 1.0, False, 0.0, 0.25), sample_rng(0, 0, 3))
    gains = draw(Augment(32, 1.0, 1.0, False, 0.0, 0.25), sample_rng(0, 0, 3), 40, 50).gains
    assert np.allclose(x.reshape(3, -1).mean(1), 100 * np.array(gains), atol=1e-3)
    assert len({round(g, 3) for g in gains}) == 3  # a cast, not a brightness change


def test_gamma_bends_the_tone_curve_both_ways_and_leaves_the_other_choices_as_they_were():
    from bigseg.train.transforms import draw

    plain, toned = Augment(32, 0.75, 1.5, True, 0.3, 0.2), Augment(32, 0.75, 1.5, True, 0.3, 0.2, 0.5)
    exponents = []
    for i in range(200):
        a, b = draw(plain, sample_rng(0, 0, i), 40, 50), draw(toned, sample_rng(0, 0, i), 40, 50)
        assert a.gamma is None and (a.scale, a.y, a.x, a.flip, a.jitter, a.gains) == \
            (b.scale, b.y, b.x, b.flip, b.jitter, b.gains)
        exponents.append(b.gamma)
    assert all(1 / 1.5 <= g <= 1.5 for g in exponents)
    assert 0.35 < np.mean(np.array(exponents) > 1) < 0.65  # darker and brighter about equally often
    # black and white stay, mid-grey moves as 255 * (x / 255) ** g; both paths agree
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 13:26], image[:, 26:] = 128, 255
    label = np.zeros((40, 40), np.uint8)
    aug = Augment(40, 1.0, 1.0, False, 0.0, 0.0, 0.5)
    g = draw(aug, sample_rng(0, 0, 7), 40, 40).gamma
    x, _ = augment(image, label, aug, sample_rng(0, 0, 7))
    assert x[:, :, 5].max() == 0 and np.allclose(x[:, :, 35], 255) and not np.isclose(g, 1, atol=0.05)
    assert np.allclose(x[:, :, 20], 255 * (128 / 255) ** g, atol=1e-3)
    one = Frames(n=1)
    one.items = [(image, label)]
    y, _ = DeviceData(one.split(), torch.device("cpu")).sample(0, aug, sample_rng(0, 0, 7))
    assert np.abs(y.numpy() - x).max() < 1e-3


def test_quarter_turns_move_image_label_and_targets_together_on_both_paths():
    from bigseg.train.transforms import draw

    plain, turned = Augment(48, 1.0, 1.0, True), Augment(48, 1.0, 1.0, True, rotate=True)
    for i in range(12):  # turning is drawn last: the other choices are those of a run without it
        a, b = draw(plain, sample_rng(0, 0, i), 40, 50), draw(turned, sample_rng(0, 0, i), 40, 50)
        assert a.turns == 0 and (a.scale, a.y, a.x, a.flip) == (b.scale, b.y, b.x, b.flip)
    assert {draw(turned, sample_rng(0, 0, i), 40, 50).turns for i in range(40)} == {0, 1, 2, 3}
    frames = Frames(n=3, size=(48, 48))
    data = DeviceData(frames.split(), torch.device("cpu"))
    for i in range(3):
        image, label = frames[i]
        target = np.eye(4, dtype=np.float32)[label % 4]
        x, y, t = augment(image, label, turned, sample_rng(7, 0, i), target)
        d = draw(turned, sample_rng(7, 0, i), 48, 48)
        expected = np.rot90(label[:, ::-1] if d.flip else label, d.turns)
        assert np.array_equal(y, expected) and np.array_equal(t.argmax(0), expected % 4)
        dx, dy = data.sample(i, turned, sample_rng(7, 0, i))
        assert np.array_equal(dy.numpy(), y) and np.abs(dx.numpy() - x).max() < 1e-3


def _scenes(tmp_path, one_scene=False):
    from bigseg.train.data import DataSet, DataSettings, SplitSettings

    learnable_scene(tmp_path, "a", 300, 260, nodata=0)
    if not one_scene:
        learnable_scene(tmp_path, "b", 240, 200, seed=1)
        learnable_scene(tmp_path, "c", 200, 220, seed=2)
    classes_csv(tmp_path / "classes.csv")
    for path in (tmp_path / "labels").glob("*.tif"):  # an unlabelled corner in each scene
        with rasterio.open(path, "r+") as f:
            label = f.read(1)
            label[:40, :50] = 255
            f.write(label, 1)
    with rasterio.open(tmp_path / "images" / "a.tif", "r+") as f:  # and the image's nodata in one
        image = f.read()
        image[:, -30:, -60:] = 0
        f.write(image)
    return DataSet(tmp_path, DataSettings(split=SplitSettings(block=96, buffer=8)))


@pytest.mark.parametrize("one_scene, rare", [(False, 0.0), (True, 0.0), (False, 0.1)],
                         ids=["whole scenes", "blocks of one scene", "rare-class sampling"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.6, 1.6)], ids=["same", "scaled"])
def test_scene_windows_cut_on_the_device_are_the_worker_paths_windows(tmp_path, one_scene, rare, scales):
    from bigseg.train.data import EpochView, RandomWindows

    train = _scenes(tmp_path, one_scene).split("train")
    data = DeviceData(train, torch.device("cpu"))
    assert len(data) == len(train.regions) and data.nbytes == sum(
        b.width * b.height * 4 for b in map(train.source.bounds, train.regions))
    sampler = RandomWindows(train.source, train.regions, 24, 1, rare, len(train.classes))
    assert (sampler.class_probabilities is not None) == bool(rare)
    aug = Augment(64, *scales, True, 0.2, 0.1, 0.0, rotate=True)
    view = EpochView(train.source, sampler, sampler.epoch(3, 1), aug, 3, 1)
    batch = next(data.batches(sampler, view.keys, aug, 3, 1, 2))
    assert torch.equal(batch[1][1], data._sample(sampler, 1, aug, sample_rng(3, 1, 1))[1])
    for k in range(24):
        image, label = view[k]
        x, y = data._sample(sampler, k, aug, sample_rng(3, 1, k))
        same = (y.numpy() == label).mean()
        diff = np.abs(x.numpy() - image)
        if scales == (1.0, 1.0):  # no resampling: the same pixels, the same ignore
            assert same == 1 and diff.max() < 1e-3, k
        else:
            assert same > 0.99 and diff.mean() < 3, k
    # the scene with nodata: its ignore travels to the device
    assert any((data.labels[key] == IGNORE).any() for key in data.labels)


def test_scenes_too_large_for_the_gpu_are_refused_before_any_is_read(tmp_path, monkeypatch):
    train = _scenes(tmp_path).split("train")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200_000, 800_000))
    monkeypatch.setattr(type(train.source), "read", lambda *a, **k: pytest.fail("read before the size check"))
    with pytest.raises(TrainingError, match=r"training scenes need .* without --data-on-device"):
        DeviceData(train, torch.device("cuda"))


def test_training_on_scenes_held_on_the_device_equals_training_from_workers(tmp_path, capsys):
    """At scale 1 and without photometric jitter (whose float rounding differs by 1e-5 between the
    paths, enough to flip the sign of Adam's first update of a near-zero gradient) the two paths make
    the same batches, so the same run gives the same model."""
    from tests.cli_helpers import run_cli

    _scenes(tmp_path / "data")
    losses = []
    for extra in ([], ["--data-on-device"]):
        run = tmp_path / f"run{len(extra)}"
        code, _, err = run_cli(capsys, "train", "--data", tmp_path / "data", "--run", run, "--device", "cpu",
                               "--crop", "64", "--batch-size", "2", "--workers", "0", "--epochs", "2",
                               "--windows-per-epoch", "4", "--scale-min", "1", "--scale-max", "1", "--rotate",
                               "--eval-every", "0", "--model-config", MODEL_CONFIG, *extra)
        assert code == 0, err
        losses.append([e["train_loss"] for e in json.loads((run / "log.json").read_text())])
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_a_stated_pixel_size_is_recorded_for_imagery_without_one_and_refused_against_a_known_one(tmp_path, capsys):
    from bigseg.checkpoint import load_checkpoint

    folders = make_generic_dataset(tmp_path / "photos", n=4)
    common = ("--device", "cpu", "--crop", "64", "--batch-size", "2", "--workers", "0", "--epochs", "1",
              "--eval-every", "0", "--max-steps", "1", "--model-config", MODEL_CONFIG)
    code, _, err = run_cli(capsys, "train", "--data", folders, "--run", tmp_path / "a", "--pixel-size", "0.3", *common)
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    assert ckpt.input["pixel_size"] == [0.3, 0.3] and ckpt.input["units"] == "metre"
    scenes = tmp_path / "scenes"
    learnable_scene(scenes, "a", 128, 96)
    learnable_scene(scenes, "b", 128, 96, seed=1)
    classes_csv(scenes / "classes.csv")
    code, _, err = run_cli(capsys, "train", "--data", scenes, "--run", tmp_path / "b", "--pixel-size", "2", *common,
                           "--windows-per-epoch", "2")
    assert code == 1 and "--pixel-size 2 m, but the training imagery says its pixels are 0.5 metre" in err, err
    # imagery in Web Mercator records its ground pixels (0.5 CRS metres at 33.8 degrees north: 0.416 m),
    # as predict measures an input's
    import math

    from pyproj import Transformer

    mercator = tmp_path / "mercator"
    learnable_scene(mercator, "a", 128, 96, crs="EPSG:3857")
    learnable_scene(mercator, "b", 128, 96, seed=1, crs="EPSG:3857")
    classes_csv(mercator / "classes.csv")
    code, _, err = run_cli(capsys, "train", "--data", mercator, "--run", tmp_path / "c", *common, "--windows-per-epoch", "2")
    assert code == 0, err
    _, lat = Transformer.from_crs(3857, 4326, always_xy=True).transform(500000 + 32, 4000000 - 24)  # the centre
    recorded = load_checkpoint(tmp_path / "c" / "last.pt").input
    assert recorded["units"] == "metre"
    np.testing.assert_allclose(recorded["pixel_size"], 0.5 * math.cos(math.radians(lat)), rtol=1e-6)
