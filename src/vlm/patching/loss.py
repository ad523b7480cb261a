"""The language-model head and its loss fused: the full ``[tokens, vocab]`` logits are never made.

The model's own forward runs with a pre-hook on ``lm_head`` that keeps the final hidden states
and lets the head compute one position only; the loss is then computed by the fused kernel from
those hidden states and the head's weight, with the labels shifted as Hugging Face's causal-LM
loss shifts them. Without labels (generation, evaluation of logits) the model is untouched.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vlm.data.encoding import IGNORE_INDEX

from .report import PatchReport


def patch_fused_cross_entropy(model: nn.Module, report: PatchReport) -> None:
    from vlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    top = _top_model(model)
    head = getattr(top, "lm_head", None)
    if not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        report.skipped["cross_entropy: no plain nn.Linear lm_head"] += 1
        return
    text_config = top.config.get_text_config() if hasattr(top.config, "get_text_config") else top.config
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        # The loss would be of the head's raw logits, not of the soft-capped ones the model trains on.
        report.skipped["cross_entropy: soft-capped logits"] += 1
        return
    original = top.forward

    def forward(self, *args, labels=None, **kwargs):  # noqa: ANN001
        if labels is None:
            return original(*args, **kwargs)
        kept: dict[str, torch.Tensor] = {}

        def keep_hidden(module, inputs):  # noqa: ANN001
            kept["hidden"] = inputs[0]
            return (inputs[0][..., -1:, :],)

        handle = self.lm_head.register_forward_pre_hook(keep_hidden)
        try:
            outputs = original(*args, **kwargs)
        finally:
            handle.remove()
        hidden = kept["hidden"]
        shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        outputs.loss = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, shifted.reshape(-1).to(hidden.device),
            bias=self.lm_head.bias, ignore_index=IGNORE_INDEX,
        )
        outputs.logits = None  # only the last position was computed: do not hand out a misleading tensor
        return outputs

    # generate() checks its inputs against the forward's named parameters (pixel_values, image_sizes, ...):
    # the wrapper shows the original's, which it passes on.
    named = inspect.signature(original).parameters.values()
    forward.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *named])
    report.replace_forward(top, forward)
    report.patched["cross_entropy"] += 1


def _top_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT's wrappers (``PeftModel`` → ``LoraModel`` → model)."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model
