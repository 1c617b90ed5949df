"""bigseg: semantic segmentation of very large images.

    from bigseg import Predictor, load_model, predict_file
    predictor = Predictor(load_model("ladder-dn121-camvid"), device="auto", tile=1024)
    predict_file(predictor, Path("city.tif"), Path("city.mask.tif"))
    labels = predictor.segment(image_chw)          # an in-memory image, same tiling
"""
__version__ = "0.1.0"

from bigseg.errors import BigsegError

_API = {
    "Predictor": ("bigseg.infer.predictor", "Predictor"),
    "load_model": ("bigseg.checkpoint", "resolve_model"),
    "predict_file": ("bigseg.run.file_job", "predict_file"),
    "predict": ("bigseg.run.batch", "predict"),
    "JobOptions": ("bigseg.run.file_job", "JobOptions"),
    "ReadOptions": ("bigseg.io.readers", "ReadOptions"),
    "WriteOptions": ("bigseg.io.kinds", "WriteOptions"),
    "VectorOptions": ("bigseg.vector.features", "VectorOptions"),
}


def __getattr__(name: str):
    # the API loads torch on first use, so `bigseg --version` and `--help` stay quick
    if name not in _API:
        raise AttributeError(name)
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)


__all__ = ["BigsegError", *_API, "__version__"]
