"""`vlm-bench`: the whole training step of a full-size model, this framework's and its peers' side by
side, each recipe in its own process on the same inputs (work: what is trained; measure: timing and
memory; recipes: how each peer and this framework build their step; lora_init: the same LoRA weights for every recipe
and their first grads; worker: one recipe's process)."""
