"""Our Triton kernels patched into a loaded model, each switchable from config (``kernels.*``).

Patches work by module type and attribute names, not by family, so a new family whose modules
follow the Hugging Face conventions gets them without changes here. Every patch can be undone.
"""

from .apply import apply_kernels
from .report import PatchReport
from .settings import KERNELS, KernelSettings

__all__ = ["KERNELS", "KernelSettings", "PatchReport", "apply_kernels"]
