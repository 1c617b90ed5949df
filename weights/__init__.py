"""The shipped weights (`*.pt`), their `manifest.json` and model card, installed with bigseg as
the package data `bigseg.weights` (found through `bigseg.manifest`)."""
