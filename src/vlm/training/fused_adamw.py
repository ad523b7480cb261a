"""``FusedAdamW8bit``: AdamW with bitsandbytes-style 8-bit blockwise states, one launch per parameter group.

Each group's states are one flat buffer (each parameter's part padded to whole state blocks, so that no block
is shared by two parameters); a step gathers the group's grads and parameters into flat buffers, runs
``vlm.kernels.adamw_8bit`` once, and copies the parameters back in one multi-tensor copy. Nothing in it waits
for the device. The states live on the parameters' device (not paged), 2 bytes a parameter plus a scale a block.

A parameter whose grad is ``None`` in a step is left as it is, states included, as ``torch.optim.AdamW`` does.
The states are kept with the group's first parameter, so ``state_dict`` / ``load_state_dict`` (and so
checkpoints and exact resume) carry them as any optimizer's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vlm.kernels.adamw_8bit import STATE_BLOCK, adamw_8bit_step, state_blocks


def state_maps(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of the state codes: bitsandbytes' signed (first moment) and unsigned (second) dynamic maps."""
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=True).to(device), create_dynamic_map(signed=False).to(device)


@dataclass
class _Layout:
    """Where each parameter of a group sits in the flat buffers."""

    numels: list[int]
    pads: list[int]  # zeros after each parameter, up to a whole block
    blocks: list[int]  # state blocks of each parameter, its padding included

    @classmethod
    def of(cls, params: list[torch.Tensor]) -> _Layout:
        numels = [p.numel() for p in params]
        blocks = [state_blocks(n) for n in numels]
        return cls(numels, [b * STATE_BLOCK - n for b, n in zip(blocks, numels)], blocks)

    @property
    def total(self) -> int:
        return sum(self.blocks) * STATE_BLOCK

    def split_sizes(self) -> list[int]:
        return [size for numel, pad in zip(self.numels, self.pads) for size in (numel, pad)]


class FusedAdamW8bit(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self._layouts: list[_Layout] = []  # one a group, in order: filled by add_param_group
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._active: dict[tuple[int, tuple[bool, ...]], torch.Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        for param in params:
            if param.dtype != torch.float32:
                raise ValueError(f"FusedAdamW8bit updates fp32 parameters; got one in {param.dtype}")
        self._layouts.append(_Layout.of(params))

    def _group_state(self, group: dict[str, Any], layout: _Layout) -> dict[str, Any]:
        params = group["params"]
        state = self.state[params[0]]
        if not state:
            total, device = layout.total, params[0].device
            signed, _ = self._maps_on(device)
            zero_code = int(torch.searchsorted(signed, torch.zeros((), device=device)))  # m starts at 0
            state["step"] = 0
            state["m_codes"] = torch.full((total,), zero_code, dtype=torch.uint8, device=device)
            state["v_codes"] = torch.zeros(total, dtype=torch.uint8, device=device)  # the unsigned map starts at 0
            state["m_absmax"] = torch.zeros(total // STATE_BLOCK, device=device)
            state["v_absmax"] = torch.zeros(total // STATE_BLOCK, device=device)
        return state

    def _maps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            self._maps[device] = state_maps(device)
        return self._maps[device]

    def _active_blocks(self, index: int, layout: _Layout, has_grad: tuple[bool, ...], device: torch.device) -> torch.Tensor:
        key = (index, has_grad)
        if key not in self._active:
            flags = torch.repeat_interleave(torch.tensor(has_grad, dtype=torch.uint8), torch.tensor(layout.blocks))
            self._active[key] = flags.to(device)
        return self._active[key]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            has_grad = tuple(p.grad is not None for p in params)
            if not any(has_grad):
                continue
            layout = self._layouts[index]
            state = self._group_state(group, layout)
            device = params[0].device
            grads, values = [], []
            for param, numel, pad in zip(params, layout.numels, layout.pads):
                grad = param.grad
                if grad is not None and grad.is_sparse:
                    raise ValueError("FusedAdamW8bit does not take sparse grads")
                grads.append(grad.reshape(-1) if grad is not None else param.new_zeros(numel))
                values.append(param.detach().reshape(-1))
                if pad:
                    grads.append(param.new_zeros(pad))
                    values.append(param.new_zeros(pad))
            flat_grads, flat_params = torch.cat(grads).float(), torch.cat(values)
            state["step"] += 1
            adamw_8bit_step(
                flat_params, flat_grads, state["m_codes"], state["v_codes"], state["m_absmax"], state["v_absmax"],
                self._active_blocks(index, layout, has_grad, device), self._maps_on(device), lr=float(group["lr"]),
                betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], step=state["step"],
            )
            updated = torch.split(flat_params, layout.split_sizes())[::2]
            changed = [i for i, g in enumerate(has_grad) if g]
            torch._foreach_copy_([params[i].detach().view(-1) for i in changed], [updated[i] for i in changed])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype: the codes (exact in any float) go back to bytes.
        for group in self.param_groups:
            state = self.state.get(group["params"][0])
            if state:
                for key in ("m_codes", "v_codes"):
                    state[key] = state[key].to(torch.uint8)
                for key in ("m_absmax", "v_absmax"):
                    state[key] = state[key].float()
