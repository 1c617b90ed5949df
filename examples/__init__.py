"""The example image shipped with bigseg (installed as bigseg.example_images; see bigseg/examples.py)."""
