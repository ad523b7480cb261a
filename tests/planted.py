"""Models with one planted sensitive layer: outlier weights that meet outlier input activations.

In the planted layer every row gets one huge weight in the same 64-value quantization block as
input channel ``channel``; the layer feeding it amplifies that channel. Quantized, the block's
scale is set by the huge weight, the ordinary weight of ``channel`` rounds to about zero, and the
amplified activation it multiplies is lost: the layer's output error approaches 100%, while
every other layer keeps the usual few percent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

WEIGHT_OUTLIER = 40.0  # times the layer's weight std
ACTIVATION_OUTLIER = 100.0  # times the feeding channel's usual size


@torch.no_grad()
def plant_outliers(layer: nn.Linear, feeder: nn.Linear, channel: int, seed: int = 0) -> None:
    """Outlier weights in ``layer`` next to input ``channel``; ``feeder`` amplifies that channel."""
    generator = torch.Generator().manual_seed(seed)
    block_start = channel // 64 * 64
    neighbour = block_start + (channel - block_start + 1) % 64  # same block, another column
    std = layer.weight.float().std()
    signs = torch.randint(0, 2, (layer.out_features,), generator=generator).float() * 2 - 1
    layer.weight[:, neighbour] = (signs * WEIGHT_OUTLIER * std).to(layer.weight.dtype)
    feeder.weight[channel] *= ACTIVATION_OUTLIER
    if feeder.bias is not None:
        feeder.bias[channel] *= ACTIVATION_OUTLIER


class ToyLM(nn.Module):
    """A language model made of nothing but ``nn.Linear`` layers around an embedding: residual
    MLP blocks and an output head. Calibration must work on any such tree, not only the families."""

    def __init__(self, vocab: int = 96, width: int = 64, hidden: int = 128, blocks: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(width, hidden), "down": nn.Linear(hidden, width)}) for _ in range(blocks)
        )
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block["down"](torch.relu(block["up"](nn.functional.layer_norm(h, h.shape[-1:]))))
        return self.head(nn.functional.layer_norm(h, h.shape[-1:]))

    def plant(self, block: int = 1, channel: int = 5) -> str:
        """Plant the outliers into ``blocks[block].down``; returns its name."""
        plant_outliers(self.blocks[block]["down"], self.blocks[block]["up"], channel)
        with torch.no_grad():  # keep the amplified channel active through the ReLU
            self.blocks[block]["up"].bias[channel] = self.blocks[block]["up"].weight[channel].abs().sum()
        return f"blocks.{block}.down"


def toy_batches(n: int, vocab: int = 96, tokens: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (4, tokens), generator=generator)} for _ in range(n)]


def toy_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"])


def every_position(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


# Tiny Qwen2-VL: the last decoder layer's MLP output, fed by its up projection.
QWEN_PLANTED = "model.language_model.layers.1.mlp.down_proj"
QWEN_FEEDER = "model.language_model.layers.1.mlp.up_proj"


def planted_checkpoint(source: str | Path, out_dir: str | Path, family, channel: int = 5) -> Path:
    """A copy of the tiny checkpoint ``source`` (processor files included) with a planted layer."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    shutil.copytree(source, out_dir)
    model = family.model_class.from_pretrained(source, dtype=torch.float32)
    plant_outliers(model.get_submodule(QWEN_PLANTED), model.get_submodule(QWEN_FEEDER), channel)
    for weights in out_dir.glob("*.safetensors"):
        weights.unlink()
    model.save_pretrained(out_dir)
    return out_dir
