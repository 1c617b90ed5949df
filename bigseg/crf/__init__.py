"""Dense CRF refinement as in DeepLab v1/v2: settings (`params`, no torch) and mean-field
inference with two filtering back-ends (`meanfield`)."""
