"""Our Triton kernels patched into a loaded model, each switchable from config (``kernels.*``).

Patches work by module type and attribute names, not by family, so a new family whose modules
follow the Hugging Face conventions gets them without changes here.
"""

from .apply import KernelSettings, PatchReport, apply_kernels

__all__ = ["KernelSettings", "PatchReport", "apply_kernels"]
