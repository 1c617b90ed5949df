"""Polygons and areas of class masks: block by block equals whole (regions across one, two and many
cuts, rings, holes, corner contacts under 4- and 8-connectivity), attributes and CRS read back,
areas against analytic values (projected and EPSG:4326), atomic files, real masks, the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from bigseg.run.vectorize import VectorOptions, vectorize_file
from bigseg.tiling.geometry import Georef
from bigseg.vector.areas import AreaStats, Ground
from bigseg.vector.polygons import StreamingPolygons
from tests.cli_helpers import run_cli


def mask_with_every_case() -> np.ndarray:
    """Regions across one, two and many strip cuts, a ring with a hole (and an island in the hole),
    corner contacts, single pixels, nodata."""
    import cv2

    m = np.zeros((240, 320), np.uint8)
    m[10:30, 10:300] = 1                     # one cut or none
    m[40:200, 20:40] = 2                     # many cuts (a tall bar)
    cv2.circle(m, (160, 120), 70, 3, -1)     # a disc ...
    cv2.circle(m, (160, 120), 40, 1, -1)     # ... made a ring by a hole of another class,
    cv2.circle(m, (160, 120), 12, 3, -1)     # with an island of the ring's class inside
    for k in range(12):                      # a diagonal staircase: 8-connected only
        m[100 + k, 260 + k] = 2
    m[150:152, 250:252] = 1                  # a square touching another only at a corner
    m[152:154, 252:254] = 1
    m[220:235, 100:220] = 255                # nodata: no region
    m[5, 5] = 3                              # single pixels
    m[239, 319] = 2
    return m


def polygonise(mask: np.ndarray, rows: int, connectivity: int) -> list[tuple[int, object]]:
    p = StreamingPolygons(mask.shape[1], mask.shape[0], connectivity)
    out = []
    for top in range(0, mask.shape[0], rows):
        out += list(p.add(mask[top:top + rows], top))
    return sorted(out + list(p.finish()), key=lambda r: (r[0], r[1].area, r[1].bounds))


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("rows", [1, 7, 64, 119])
def test_block_by_block_equals_the_whole_mask_at_once(rows, connectivity):
    mask = mask_with_every_case()
    whole, strips = polygonise(mask, 240, connectivity), polygonise(mask, rows, connectivity)
    assert len(strips) == len(whole)
    for (va, a), (vb, b) in zip(strips, whole):
        assert va == vb and a.is_valid and a.area == b.area and a.symmetric_difference(b).area == 0
    # every pixel of a class lies in exactly one of its polygons; nodata in none
    from rasterio.features import rasterize
    back = rasterize(((g, v) for v, g in strips), out_shape=mask.shape, fill=255, dtype="uint8")
    assert np.array_equal(back, mask)
    holes = [g for v, g in strips if v == 3 and g.geom_type == "Polygon" and len(g.interiors)]
    assert holes  # the ring keeps its hole (and the island is a polygon of its own)
    if connectivity == 8:
        staircase = [g for v, g in strips if v == 2 and g.bounds == (260.0, 100.0, 272.0, 112.0)]
        assert len(staircase) == 1 and staircase[0].geom_type == "MultiPolygon"  # valid: parts meet at corners
    else:
        assert len([g for v, g in strips if v == 2 and 260 <= g.bounds[0] < 272]) == 12


def test_areas_are_pixel_counts_times_the_ground_area_of_a_pixel():
    mask = mask_with_every_case()
    utm = Ground(Georef(rasterio.crs.CRS.from_epsg(32633), from_origin(500000, 4000000, 0.5, 0.5)))
    stats = AreaStats(["a", "b", "c", "d"], utm)
    for top in range(0, 240, 50):
        stats.add(top, mask[top:top + 50])
    counts = np.bincount(mask[mask < 4].ravel(), minlength=4)
    assert stats.pixels.tolist() == counts.tolist() and stats.nodata_pixels == (mask >= 4).sum()
    assert stats.area_m2 == pytest.approx(counts * 0.25)
    table = stats.table()
    assert table[1]["area_ha"] == pytest.approx(counts[1] * 0.25 / 1e4) and sum(r["share"] for r in table) == \
        pytest.approx(1, abs=1e-5)
    # EPSG:4326: a one-degree cell from 60 N to 61 N, against the ellipsoid's zone area (WGS84)
    wgs = Ground(Georef(rasterio.crs.CRS.from_epsg(4326), from_origin(10.0, 61.0, 1.0, 1.0)))
    geo = AreaStats(["land"], wgs)
    geo.add(0, np.zeros((1, 1), np.uint8))
    a, f = 6378137.0, 1 / 298.257223563
    b = a * (1 - f)
    e = math.sqrt(1 - (b / a) ** 2)
    zone = lambda p: math.pi * b * b * (math.sin(p) / (1 - (e * math.sin(p)) ** 2)
                                        + math.log((1 + e * math.sin(p)) / (1 - e * math.sin(p))) / (2 * e))
    expected = (zone(math.radians(61)) - zone(math.radians(60))) / 360  # 6123.14 km2
    assert geo.area_m2[0] == pytest.approx(expected, rel=1e-9)
    # and a polygon of that cell measured geodesically (its edges geodesics, not parallels: 3e-5 less)
    import shapely
    area, perimeter = wgs.measure(shapely.box(10, 60, 11, 61))
    assert area == pytest.approx(expected, rel=1e-4) and perimeter > 2 * 111e3


def write_mask(path, mask, crs="EPSG:32633", transform=None, classes=None):
    profile = dict(driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1, dtype="uint8", nodata=255,
                   crs=crs, transform=transform or from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=64,
                   blockysize=64)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(mask, 1)
        if classes:
            ds.update_tags(classes=json.dumps(classes))
    return path


def test_the_vector_file_carries_the_crs_classes_areas_and_source(tmp_path):
    import pyogrio

    mask = mask_with_every_case()
    src = write_mask(tmp_path / "city.mask.tif", mask, classes=["field", "road", "water", "roof"])
    result = vectorize_file(src, tmp_path / "city.polygons.gpkg", VectorOptions(min_area=2.0),
                            areas_csv=tmp_path / "city.areas.csv")
    info = pyogrio.read_info(result.output)
    assert info["crs"] == "EPSG:32633" and list(info["fields"]) == ["class", "class_name", "area_m2",
                                                                      "perimeter_m", "source"]
    meta, _, wkb, fields = pyogrio.raw.read(result.output)
    import shapely

    geoms = shapely.from_wkb(wkb)
    cls, names, area, perimeter, source = fields
    assert set(names) <= {"field", "road", "water", "roof"} and all(names[i] == ["field", "road", "water", "roof"][c]
                                                                    for i, c in enumerate(cls))
    assert np.allclose(area, shapely.area(geoms)) and np.allclose(perimeter, shapely.length(geoms))
    assert area.min() >= 2.0 and (source == str(src)).all()  # single pixels (0.25 m2) dropped
    assert result.polygons == len(geoms) and (tmp_path / "city.areas.csv").read_text().startswith("value,class,")


def test_a_killed_run_leaves_no_finished_looking_file_and_the_rerun_completes_it(tmp_path, capsys, monkeypatch):
    from bigseg.vector import features

    src = write_mask(tmp_path / "a.mask.tif", mask_with_every_case())
    real = features.StreamingPolygons.add
    calls = {"n": 0}

    def killed(self, labels, row_off, valid=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        yield from real(self, labels, row_off, valid)

    monkeypatch.setattr(features, "STRIP_PIXELS", 64 * 320)
    monkeypatch.setattr(features.StreamingPolygons, "add", killed)
    code, _, _ = run_cli(capsys, "vectorize", src)
    assert code != 0 and not (tmp_path / "a.polygons.gpkg").exists()
    assert not [p for p in tmp_path.iterdir() if "polygons" in p.name]  # the partial file removed too
    monkeypatch.setattr(features.StreamingPolygons, "add", real)
    code, _, err = run_cli(capsys, "vectorize", src)
    assert code == 0 and (tmp_path / "a.polygons.gpkg").is_file(), err
    code, out, _ = run_cli(capsys, "vectorize", src, "--json")
    assert code == 0 and json.loads(out)["skipped"]  # finished: skipped on a re-run


def test_predict_writes_polygons_and_areas_beside_the_mask_and_in_json(tmp_path, tiny_checkpoint, capsys):
    from tests.conftest import write_geotiff

    src = write_geotiff(tmp_path / "scene.tif", 200, 150, nodata=0)
    code, out, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "out", "--vector", "geojson",
                             "--areas", "--json", "--device", "cpu", "--tile", "128")
    assert code == 0, err
    done = json.loads(out)["done"][0]
    extras = sorted(p.rsplit("/", 1)[-1] for p in done["extras"])
    assert extras == ["scene.areas.csv", "scene.polygons.geojson"]
    areas = done["areas"]
    with rasterio.open(tmp_path / "out" / "scene.mask.tif") as ds:
        labels = ds.read(1)
    counts = np.bincount(labels[labels < 3].ravel(), minlength=3)
    assert [c["pixels"] for c in areas["classes"]] == counts.tolist()
    assert [c["area_m2"] for c in areas["classes"]] == pytest.approx((counts * 0.25).tolist())
    # a re-run skips the finished job; asking for polygons later makes them from the mask alone
    code, out, _ = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "out", "--vector", "gpkg",
                           "--json", "--device", "cpu", "--tile", "128")
    again = json.loads(out)["done"][0]
    assert code == 0 and again["tiles"] == 0 and again["extras"][0].endswith("scene.polygons.gpkg")


def test_dubai_tile7s_labels_as_a_mask_rasterise_back_and_their_areas_are_pixel_counts(shared_data, tmp_path):
    import pyogrio
    import shapely
    from rasterio.features import rasterize

    mask = shared_data / "aerial" / "dubai" / "labels" / "tile7.tif"
    result = vectorize_file(mask, tmp_path / "tile7.polygons.gpkg", VectorOptions())
    _, _, wkb, (cls, *_rest) = pyogrio.raw.read(result.output)
    with rasterio.open(mask) as ds:
        labels = ds.read(1)
    back = rasterize(zip(shapely.from_wkb(wkb), cls.tolist()), out_shape=labels.shape, fill=255, dtype="uint8")
    assert (back == labels).mean() >= 0.999
    counts = np.bincount(labels[labels != 255].ravel(), minlength=5)[:5]
    table = {row["value"]: row["pixels"] for row in result.areas.table()}
    assert [table[v] for v in range(5)] == counts.tolist()  # no georeferencing: a pixel's area is one


def test_web_mercator_areas_are_ellipsoidal_ground_areas_and_utm_stays_planar():
    """EPSG:3857 at 40 degrees north draws the ground 1.71x too large: the table and the polygons
    measure on the ellipsoid (within 0.5% of the polygons' geodesic areas), and say so."""
    import shapely
    from pyproj import Geod, Transformer

    transform = from_origin(-8_000_000, 4_900_000, 0.5, 0.5)  # 40.2 N, as the shared orthomosaic
    mercator = Ground(Georef(rasterio.crs.CRS.from_epsg(3857), transform), 2000, 2000)
    assert mercator.method == "ellipsoidal"
    assert Ground(Georef(rasterio.crs.CRS.from_epsg(32633), from_origin(500000, 4000000, 0.5, 0.5)), 2000, 2000).method \
        == "planar"
    mask = np.zeros((2000, 2000), np.uint8)
    mask[:, 1000:] = 1
    stats = AreaStats(["west", "east"], mercator)
    for top in range(0, 2000, 256):
        stats.add(top, mask[top:top + 256])
    to_lonlat = Transformer.from_crs(3857, 4326, always_xy=True)
    geod = Geod(ellps="WGS84")
    for value, (x0, x1) in enumerate(((0, 1000), (1000, 2000))):
        box = shapely.box(transform.c + x0 * 0.5, transform.f - 2000 * 0.5, transform.c + x1 * 0.5, transform.f)
        ring = shapely.segmentize(box, 1.0)  # its edges followed closely on the ellipsoid
        lonlat = shapely.transform(ring, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
        geodesic = abs(geod.geometry_area_perimeter(lonlat)[0])
        assert stats.area_m2[value] == pytest.approx(geodesic, rel=0.005)
        assert mercator.measure(box)[0] == pytest.approx(geodesic, rel=0.005)
        assert box.area > 1.6 * geodesic  # what a flat-map area would have said
    assert stats.to_dict()["area_method"] == "ellipsoidal" and stats.csv().splitlines()[1].endswith(",ellipsoidal")


def test_vectorize_writes_into_an_existing_folder_whose_name_has_a_dot(tmp_path, capsys):
    mask = write_mask(tmp_path / "m.mask.tif", np.kron(np.eye(3, dtype=np.uint8), np.ones((20, 20), np.uint8)))
    (tmp_path / "some.dir").mkdir()
    code, _, err = run_cli(capsys, "vectorize", mask, "-o", f"{tmp_path / 'some.dir'}/")
    assert code == 0, err
    assert (tmp_path / "some.dir" / "m.polygons.gpkg").is_file()
    code, _, err = run_cli(capsys, "vectorize", mask, "-f", "nope")
    assert code == 1 and "--format takes gpkg" in err and "--vector" not in err


def test_a_mask_without_georeferencing_is_not_written_as_lonlat_geojson_and_takes_names_from_classes_csv(
        tmp_path, capsys):
    """GeoJSON cannot say 'no CRS': refused in one line; GeoPackage records none. The names come
    from the classes.csv a raster-scene data set keeps beside labels/."""
    import cv2
    import pyogrio

    (tmp_path / "labels").mkdir()
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 10:40], mask[35:50, 50:70] = 1, 3
    cv2.imwrite(str(tmp_path / "labels" / "m.png"), mask)
    (tmp_path / "classes.csv").write_text("value,name,red,green,blue\n0,land,1,2,3\n1,building,4,5,6\n"
                                          "3,water,7,8,9\n255,unlabelled,0,0,0\n")
    code, _, err = run_cli(capsys, "vectorize", tmp_path / "labels" / "m.png", "-o", tmp_path / "m.geojson")
    assert code == 1 and "no georeferencing" in err and "gpkg" in err and not (tmp_path / "m.geojson").exists()
    code, _, err = run_cli(capsys, "vectorize", tmp_path / "labels" / "m.png", "-o", tmp_path / "m.gpkg")
    assert code == 0, err
    assert "class names from" in err
    _, _, _, values = pyogrio.raw.read(tmp_path / "m.gpkg", columns=["class", "class_name"])
    assert sorted(set(zip(values[0].tolist(), values[1].tolist()))) == [(0, "land"), (1, "building"), (3, "water")]
