"""unfog: text-to-image diffusion from first principles."""

from .errors import UnfogError
from .pipeline import Pipeline, PipelineOutput

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineOutput", "UnfogError", "__version__"]
