"""Training: data layouts, augmentation, losses and the training loop."""
