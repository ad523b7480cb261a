"""Shipping what a run learned, in three forms (``vlm-export --form``):

* ``adapter``: the LoRA adapter as PEFT saved it, with the run's processor (:mod:`.adapter`);
* ``merged``: the base dequantized, the adapter merged in, saved as a plain checkpoint (:mod:`.merge`);
* ``vllm``: the adapter under the module names vLLM's LoRA serving reads (:mod:`.vllm_lora`).
"""

from .adapter import export_adapter
from .merge import MergeError, MergeSettings, export_merged, merged_model, save_merged
from .report import FORMS, ExportError, ExportReport
from .vllm_lora import VllmLayoutError, export_vllm

__all__ = [
    "FORMS",
    "ExportError",
    "ExportReport",
    "MergeError",
    "MergeSettings",
    "VllmLayoutError",
    "export_adapter",
    "export_merged",
    "export_vllm",
    "merged_model",
    "save_merged",
]
