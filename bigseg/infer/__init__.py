"""Inference: one predictor over a `TileEngine` protocol.

- `settings.py`: the run's settings (device, precision, tiles, scales, flips, CRF, engine,
  threads), one frozen value checked once.
- `choose.py`: the one torch-free decision of device, precision and engine, with the timing cache
  `auto` reads, and whether a run starts without torch.
- `card.py`: what a checkpoint says of its model, readable without torch.
- `predictor.py`: the predictor (out-of-memory back-off, tiling of in-memory images and of files'
  tiles); `start.py`: a predictor from a model's name or file, warm (no torch) or with torch.
- `engines/`: the engines (`base.py`: the protocol and the registries; one module each for torch,
  OpenVINO, ONNX Runtime and the torch-free engine of cached exports; `export.py` and
  `exported.py`: the ONNX exports and their use in a torch run).
- `cache.py`: the cache folder and its keys; `notes.py`: what a run says once.
"""
