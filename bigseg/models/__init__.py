"""Segmentation architectures, registered by name."""
from bigseg.models import zoo as _zoo  # noqa: F401  (registers the architectures)
from bigseg.models.registry import (
    ArchSpec,
    create_model,
    get_arch,
    list_archs,
    model_config,
)

__all__ = ["ArchSpec", "create_model", "get_arch", "list_archs", "model_config"]
