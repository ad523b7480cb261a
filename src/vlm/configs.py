"""Where the Hydra configs live, and the resolvers they use.

conf/ sits at the top of the repository and is linked into the package as ``src/vlm/conf``: an
installed package reads its own copy, a source checkout (editable install) the repository's.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> Path:
    """The directory holding ``train.yaml``: the repository's ``conf/``, linked into the package as ``vlm/conf``."""
    return Path(__file__).resolve().parent / "conf"


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is available (environment or ``wandb login``)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def gpu_count(default: int = 1) -> int:
    """GPUs on this machine (how many sweep jobs run side by side), or ``default`` without any."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count or int(default)


def register_resolvers() -> None:
    for name, function in (("wandb_offline", wandb_offline), ("gpu_count", gpu_count)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
