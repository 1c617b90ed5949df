"""bigseg: semantic segmentation of very large images.

    from bigseg import Segmenter, load_model
    seg = Segmenter(load_model("ladder-dn121"))
    seg.predict_file(Path("city.tif"), Path("city.mask.tif"))
"""
__version__ = "0.1.0"

from bigseg.errors import BigsegError  # noqa: E402


def __getattr__(name: str):
    # Heavy imports (torch) only when the API is used, so `bigseg --version` stays quick.
    if name == "Segmenter":
        from bigseg.inference import Segmenter
        return Segmenter
    if name == "load_model":
        from bigseg.checkpoint import resolve_model
        return resolve_model
    if name == "predict":
        from bigseg.jobs import run_predict
        return run_predict
    raise AttributeError(name)


__all__ = ["BigsegError", "Segmenter", "load_model", "predict", "__version__"]
