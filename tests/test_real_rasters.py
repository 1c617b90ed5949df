"""Every real edge-case raster in ../shared/data/rasters either predicts with its georeference and
nodata kept, or is refused with a clear reason. Skipped when the folder is absent."""
import pytest
import rasterio

from bigseg.checkpoint import load_checkpoint
from bigseg.errors import BigsegError
from bigseg.infer.predictor import Predictor
from bigseg.run.file_job import predict_file

REFUSED = {"corrupt.tif": "cannot be decoded"}


def test_every_shared_raster_predicts_or_is_refused(shared_data, tiny_checkpoint, tmp_path):
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=256, overlap=64, batch_size=4)
    rasters = sorted((shared_data / "rasters").rglob("*.tif"))
    assert len(rasters) >= 15
    for src in rasters:
        dst = tmp_path / f"{src.stem}.mask.tif"
        if src.name in REFUSED:
            with pytest.raises(BigsegError, match=REFUSED[src.name]):
                predict_file(seg, src, dst)
            assert not dst.exists()
            continue
        predict_file(seg, src, dst)
        with rasterio.open(src) as a, rasterio.open(dst) as b:
            assert (b.width, b.height) == (a.width, a.height), src.name
            assert b.crs == (a.crs if not a.gcps[0] else None), src.name
            if a.gcps[0]:
                assert len(b.gcps[0]) == len(a.gcps[0]) and b.gcps[1] == a.gcps[1], src.name
            else:
                assert b.transform == a.transform, src.name
            invalid = a.dataset_mask() == 0
            out = b.read(1)
            assert (out[invalid] == 255).all(), src.name
            assert (out[~invalid] < 3).all(), src.name



def test_gdal_block_cache_is_64_mib_not_64_bytes():
    import rasterio

    from bigseg.io.gdal import gdal_env
    with gdal_env():
        assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == 64 * 2 ** 20
