"""Checks of a training config before anything is built: no weights load, no tiny checkpoint is
built and no data is rendered until every key a user sets has been looked at.

Values that enter through one of our settings objects (:class:`~vlm.models.spec.ModelSpec`,
:class:`~vlm.quant.config.QuantConfig`, :class:`~vlm.models.lora.LoraSettings`, ...) are checked
by its ``__post_init__``; here are the checks of what nothing of ours builds before the weights
load, each raising :class:`~vlm.errors.ConfigError` with one message naming the key, the value and
what is allowed:

* every group with a ``_target_`` (``model``, ``quant``, ..., ``trainer``, ``callbacks.*``,
  ``logger.*``): a key its target does not take (``+trainer.max_step=5``), a ``???`` left unset,
  and for our own targets a value of the wrong kind for the annotated type (``quant.double_quant=maybe``);
* the keys Lightning takes directly: ``trainer.*`` (:func:`check_trainer`), ``ckpt_path``, and the
  callbacks, which are built once here to run their own checks (their ``__init__`` must have no
  side effects; those that need what the run hands them are left out);
* the optimizer (:class:`~vlm.training.optim.AdamWSettings`: the config holds a partial that is
  called only at fit time) and the schedule;
* top-level keys: ``seed``, ``validate_before_fit``, ``report_top_layers``, ``sweep_name``,
  ``optimized_metric``, ``demo_data.*`` and ``data.max_seq_length`` (read by the wiring itself).

:func:`check_lora_targets` needs the checkpoint's config, so it runs once the checkpoint is known.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vlm.errors import ConfigError

if TYPE_CHECKING:
    from vlm.models.families import ModelFamily
    from vlm.models.lora import LoraSettings

__all__ = ["PRECISIONS", "check_lora_targets", "check_run_config", "check_trainer"]

# Lightning's accepted ``precision`` values (``lightning.fabric.connector._PRECISION_INPUT``; the
# bare numbers and "bf16" are its older spellings, still accepted).
PRECISIONS: tuple[str | int, ...] = (
    "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16,
)
# Lightning's own ``ckpt_path`` keywords that make sense for ``fit``.
CKPT_KEYWORDS = ("last", "hpc", "registry")
MAX_SEED = 2**32 - 1  # numpy's bound, which Lightning's seed_everything enforces
_REMOTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_TRAINER_BOOLS = (
    "enable_progress_bar", "enable_model_summary", "enable_checkpointing", "detect_anomaly", "barebones",
    "sync_batchnorm", "inference_mode", "use_distributed_sampler",
)


def check_run_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first key of ``cfg`` (the composed ``train`` config)
    that cannot work; builds nothing but the callbacks, which it drops again."""
    _check_unset(cfg)
    _check_top_level(cfg)  # first: groups interpolate some of these (data.seed: ${seed})
    for key, node in _target_nodes(cfg):
        check_arguments(node, key)
    _check_compile_strategy(cfg)
    accelerator = check_trainer(cfg.trainer) if cfg.get("trainer") is not None else "cpu"
    _check_compile_kernels(cfg, accelerator)
    _check_optimizer(cfg.get("optimizer"), accelerator)
    if cfg.get("scheduler") is not None:
        _dry_build(cfg.scheduler, "scheduler")
    _check_demo_data(cfg.get("demo_data"))
    if cfg.get("data") is not None and "max_seq_length" in cfg.data:
        _require(cfg.data.max_seq_length, "data.max_seq_length", _is_int, "a positive integer (tokens)", minimum=1)
    _check_callbacks(cfg.get("callbacks"))


def _compiles_layers(cfg: DictConfig) -> bool:
    """Whether ``model.compile`` is ``layers`` itself: ``auto`` is never refused (where ``layers`` would be, it is
    ``none``, :func:`~vlm.models.compiling.resolve_compile`)."""
    model = cfg.get("model")
    return model is not None and model.get("compile") == "layers"


def _check_compile_strategy(cfg: DictConfig) -> None:
    if not _compiles_layers(cfg):
        return
    strategy = (cfg.get("trainer") or {}).get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    if "fsdp" in target.lower():
        # FSDP gathers each unit's weights before its forward and frees them after: not tried with compiled layers.
        raise ConfigError("model.compile=layers is not supported with FSDP (trainer=fsdp) yet: use model.compile=none")


def _check_compile_kernels(cfg: DictConfig, accelerator: str) -> None:
    """``model.compile=layers`` compiles the decoder layers with the ops they hold; the kernels patched into
    those ops (the ``kernels`` switches as ``accelerator`` decides them) cannot be traced with them (the loss
    kernel, outside the layers, can)."""
    from vlm.models.compiling import kernels_inside_layers

    kernels = cfg.get("kernels")
    if kernels is None or not _compiles_layers(cfg):
        return
    device = accelerator if accelerator in ("cuda", "mps") else "cpu"  # an Accelerator object: as off CUDA
    clashing = kernels_inside_layers(_dry_build(kernels, "kernels").resolved(device).enabled())
    if clashing:
        keys = " ".join(f"kernels.{name}=false" for name in clashing)
        raise ConfigError(
            f"model.compile=layers fuses the decoder layers' ops itself and does not take our kernels inside them "
            f"({', '.join(clashing)}): set {keys} (kernels=none kernels.cross_entropy=true keeps the loss kernel), "
            "or model.compile=none"
        )


def check_lora_targets(checkpoint: str, family: ModelFamily, lora: LoraSettings) -> list[str]:
    """The full names of the linear layers ``lora`` adapts in ``checkpoint``'s model, found on its
    weightless skeleton (built from its config.json on the meta device), by the rule
    :func:`~vlm.models.lora.apply_lora` uses; raises :class:`ConfigError` naming
    ``lora.target_modules`` (or ``model.family``) when it cannot work."""
    from vlm.models.loading import load_config, model_skeleton
    from vlm.models.lora import lora_target_names

    try:
        skeleton = model_skeleton(family, load_config(checkpoint, family))
        return lora_target_names(skeleton, family, lora)
    except ValueError as error:  # the checkpoint is of another family, or nothing matches
        raise ConfigError(str(error)) from None


# --------------------------------------------------------------------------- groups with a _target_
def _check_unset(cfg: DictConfig) -> None:
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        raise ConfigError(f"{missing[0]} is not set (???): give it on the command line, e.g. {missing[0]}=...")


def _target_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """``(key, node)`` of every node with a ``_target_``: the groups, and the entries of
    ``callbacks`` and ``logger``."""
    found = []
    for key, node in cfg.items():
        if key == "hydra" or not isinstance(node, DictConfig):
            continue
        if "_target_" in node:
            found.append((str(key), node))
            continue
        found.extend((f"{key}.{name}", child) for name, child in node.items()
                     if isinstance(child, DictConfig) and "_target_" in child)
    return found


def _target(node: DictConfig, key: str) -> Callable[..., Any]:
    from hydra.utils import get_object

    path = node.get("_target_")
    try:
        return get_object(str(path))
    except Exception:  # noqa: BLE001 - Hydra raises ImportError or its own error types
        raise ConfigError(f"{key}._target_={path!r} cannot be imported: give a class or function by its full dotted name") from None


def check_arguments(node: DictConfig, key: str) -> None:
    """Raise :class:`ConfigError` for a key of ``node`` that its ``_target_`` does not take, and,
    for our own targets (``vlm.*``), for a value of the wrong kind for the argument's annotation."""
    target = _target(node, key)
    values = {str(k): v for k, v in OmegaConf.to_container(node, resolve=True).items() if not str(k).startswith("_")}
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        names = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        for name in values:
            if name not in parameters:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean {key}.{close[0]}?" if close else f"it takes: {', '.join(names)}"
                raise ConfigError(f"{key}.{name} is not a setting of {node._target_}; {hint}")
    if str(node._target_).startswith("vlm."):
        hints = _type_hints(target)
        for name, value in values.items():
            allowed = _kind_problem(value, hints.get(name))
            if allowed:
                example = f" (a list of one: {key}.{name}=[{value}])" if allowed.endswith("a list") and isinstance(value, str) else ""
                raise ConfigError(f"{key}.{name}={value!r} must be {allowed}{example}")


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) and not _is_dataclass(target) else target)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: nothing to judge by
        return {}


def _is_dataclass(target: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(target)


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "list": "a list", "dict": "a mapping", "none": "null"}


def _kind_problem(value: Any, hint: Any) -> str | None:
    """What ``hint`` allows, in words, where ``value`` is plainly of another kind; ``None`` where it
    fits or where the hint is not one of the plain kinds judged here (anything allowing a string
    is left to the target's own checks)."""
    if hint is None:
        return None
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds: list[str] = []
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            kinds.append("none")
        elif member is bool:
            kinds.append("bool")
        elif member is int:
            kinds.append("int")
        elif member is float:
            kinds.append("float")
        elif isinstance(origin, type) and issubclass(origin, str):
            return None
        elif isinstance(origin, type) and issubclass(origin, (list, tuple, set, frozenset, Sequence)):
            kinds.append("list")
        elif isinstance(origin, type) and issubclass(origin, (dict, Mapping)):
            kinds.append("dict")
        else:
            return None  # Any, a path, an iterable...: not judged here
    if value is None:
        fits = "none" in kinds
    elif isinstance(value, bool):
        fits = "bool" in kinds
    elif isinstance(value, numbers.Integral):
        fits = "int" in kinds or "float" in kinds
    elif isinstance(value, numbers.Real):
        fits = "float" in kinds
    elif isinstance(value, str):
        fits = False
    elif isinstance(value, (list, tuple)):
        fits = "list" in kinds
    elif isinstance(value, dict):
        fits = "dict" in kinds
    else:
        fits = True
    if fits:
        return None
    words = [_KIND_WORDS[kind] for kind in dict.fromkeys(kinds) if not (kind == "int" and "float" in kinds)]
    return " or ".join(words)


def _dry_build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``node`` built, so that its target's own checks run; what it refuses becomes a ``ConfigError``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, ValueError | TypeError | MisconfigurationException) or cause is error:
            message = str(cause)
            raise ConfigError(message if message.startswith(f"{key}.") else f"{key}: {message}") from None
        raise


# --------------------------------------------------------------------------- top-level keys
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require(value: Any, key: str, kind: Callable[[Any], bool], allowed: str, minimum: float | None = None,
             maximum: float | None = None, nullable: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is of ``kind`` within [minimum, maximum] (or None where ``nullable``)."""
    if value is None and nullable:
        return
    fits = kind(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not fits:
        raise ConfigError(f"{key}={value!r} must be {allowed}")


def _check_top_level(cfg: DictConfig) -> None:
    if "seed" in cfg:
        _require(cfg.seed, "seed", _is_int, f"an integer in [0, {MAX_SEED}]", minimum=0, maximum=MAX_SEED)
    if "validate_before_fit" in cfg:
        _require(cfg.validate_before_fit, "validate_before_fit", lambda v: isinstance(v, bool), "true or false")
    if "report_top_layers" in cfg:
        _require(cfg.report_top_layers, "report_top_layers", _is_int, "an integer >= 0 (rows of the table)", minimum=0)
    for key in ("sweep_name", "optimized_metric"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip()):
            what = "a key of metrics.json, e.g. final_val_loss" if key == "optimized_metric" else "a W&B group name"
            raise ConfigError(f"{key}={value!r} must be {what} (a non-empty string) or null")
    _check_ckpt_path(cfg.get("ckpt_path"))


def _check_ckpt_path(value: Any) -> None:
    """``ckpt_path``: null, an existing local path, a remote URL (``http(s)://``, or any other
    ``scheme://`` that fsspec opens) or one of Lightning's keywords (``last``, ``hpc``, ``registry``)."""
    if value is None:
        return
    allowed = (
        "an existing checkpoint file (e.g. an earlier run's checkpoints/last.ckpt), an http(s):// URL, "
        f"one of Lightning's {', '.join(CKPT_KEYWORDS)}, or null"
    )
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"ckpt_path={value!r} must be {allowed}")
    if value in CKPT_KEYWORDS or value.startswith("registry:"):
        return
    if _REMOTE.match(value) and not value.startswith("file://"):
        return
    path = Path(value.removeprefix("file://"))
    if not path.exists():
        raise ConfigError(f"ckpt_path={value!r} does not exist: give {allowed}")


def _check_demo_data(demo: DictConfig | None) -> None:
    """``demo_data.*``, before the demo set is rendered."""
    if demo is None:
        return
    from vlm.data.demo import MIN_IMAGE_SIZE

    if "out_dir" in demo and not (isinstance(demo.out_dir, str) and demo.out_dir.strip()):
        raise ConfigError(f"demo_data.out_dir={demo.out_dir!r} must be a directory path")
    for key, minimum, allowed in (
        ("n_train", 1, "a positive integer (samples)"),
        ("n_val", 1, "a positive integer (samples)"),
        ("image_size", MIN_IMAGE_SIZE, f"an integer >= {MIN_IMAGE_SIZE} (pixels)"),
        ("seed", None, "an integer"),
    ):
        if key in demo:
            _require(demo[key], f"demo_data.{key}", _is_int, allowed, minimum=minimum)


# --------------------------------------------------------------------------- trainer
def check_trainer(trainer: DictConfig) -> str:
    """Raise :class:`ConfigError` for a ``trainer.*`` value Lightning or our streams cannot run
    with; returns the accelerator the run will use (``cpu``, ``cuda``, ...).

    The training streams never end, so steps bound a run: ``max_steps`` and ``val_check_interval``
    are counts of training batches, never ``-1`` or a fraction of an epoch.
    """
    positive = "a positive integer"
    get = trainer.get
    if "max_steps" in trainer:
        _require(get("max_steps"), "trainer.max_steps", _is_int,
                 f"{positive} (the training streams never end, so steps are what stop a run; -1 does not)", minimum=1)
    if "val_check_interval" in trainer:
        _require(get("val_check_interval"), "trainer.val_check_interval", _is_int,
                 f"{positive} (training batches between validations; the streams have no epoch to take a fraction of)",
                 minimum=1)
    for key in ("log_every_n_steps", "accumulate_grad_batches", "num_nodes"):
        if key in trainer:
            _require(get(key), f"trainer.{key}", _is_int, positive, minimum=1)
    if "check_val_every_n_epoch" in trainer:
        _require(get("check_val_every_n_epoch"), "trainer.check_val_every_n_epoch", _is_int, f"{positive} or null",
                 minimum=1, nullable=True)
    for key in ("limit_val_batches", "limit_train_batches"):
        value = get(key)
        if value is not None and not ((_is_int(value) and value >= 0) or (_is_real(value) and float(value) in (0.0, 1.0))):
            raise ConfigError(
                f"trainer.{key}={value!r} must be an integer >= 0 (batches), 1.0 (all) or null: "
                "the shard streams have no length to take another fraction of"
            )
    if "num_sanity_val_steps" in trainer:
        _require(get("num_sanity_val_steps"), "trainer.num_sanity_val_steps", _is_int, "an integer >= -1 (-1: all)", minimum=-1)
    if "gradient_clip_val" in trainer:
        _require(get("gradient_clip_val"), "trainer.gradient_clip_val", _is_real, "a number >= 0 or null", minimum=0, nullable=True)
    if get("gradient_clip_algorithm") not in (None, "norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={get('gradient_clip_algorithm')!r} must be norm, value or null")
    if "precision" in trainer:
        value = get("precision")
        if isinstance(value, bool) or value not in PRECISIONS:
            shown = ", ".join(str(p) for p in PRECISIONS if isinstance(p, str) and "-" in p)
            raise ConfigError(f"trainer.precision={value!r} must be one of Lightning's precisions: {shown}")
    for key in _TRAINER_BOOLS:
        if key in trainer and not isinstance(get(key), bool | None):
            raise ConfigError(f"trainer.{key}={get(key)!r} must be true, false or null")
    _check_strategy(get("strategy"))
    accelerator = _accelerator(get("accelerator", "auto"))
    _check_devices(get("devices", "auto"), accelerator)
    return accelerator


def _accelerator(value: Any) -> str:
    """The registered accelerator ``trainer.accelerator=value`` resolves to on this machine."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    registered = sorted(AcceleratorRegistry.available_accelerators())
    if not isinstance(value, str):
        return "cpu" if value is None else str(value)  # an Accelerator object: Lightning's to judge
    available = [name for name in ("cuda", "mps") if name in registered and AcceleratorRegistry.get(name).is_available()]
    if value == "auto":
        return available[0] if available else "cpu"
    if value == "gpu":
        if not available:
            raise ConfigError("trainer.accelerator='gpu' but this machine has no GPU (CUDA or MPS): use trainer=cpu")
        return available[0]
    if value not in registered:
        raise ConfigError(f"trainer.accelerator={value!r} is not one of auto, gpu, {', '.join(registered)}")
    if not AcceleratorRegistry.get(value).is_available():
        raise ConfigError(f"trainer.accelerator={value!r} but this machine has no {value} device: use trainer=cpu")
    return value


def _check_devices(value: Any, accelerator: str) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import AcceleratorRegistry

    allowed = "a positive integer, -1 (all), 'auto' or a list of device ids"
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if value == "auto" or accelerator not in AcceleratorRegistry.available_accelerators():
        return
    if isinstance(value, bool) or value in (0, "0", []):
        raise ConfigError(f"trainer.devices={value!r} must be {allowed}")
    if not isinstance(value, int | str | Sequence):
        raise ConfigError(f"trainer.devices={value!r} must be {allowed}")
    try:
        parsed = AcceleratorRegistry.get(accelerator).parse_devices(value)
    except (MisconfigurationException, TypeError, ValueError) as error:
        raise ConfigError(f"trainer.devices={value!r} does not work with the {accelerator} accelerator: {error}".strip()) from None
    if parsed is None or parsed == []:
        raise ConfigError(f"trainer.devices={value!r} selects no {accelerator} device: give {allowed}")


def _check_strategy(value: Any) -> None:
    if value is None or not isinstance(value, str):
        return  # a Strategy object, or Lightning's default
    from lightning.pytorch.strategies import StrategyRegistry

    known = ["auto", *StrategyRegistry.available_strategies()]
    if value not in known:
        raise ConfigError(f"trainer.strategy={value!r} is not one of {', '.join(known)}")


# --------------------------------------------------------------------------- optimizer and callbacks
def _check_optimizer(node: DictConfig | None, accelerator: str) -> None:
    """The optimizer's values, checked now although the partial is called only at fit time."""
    if node is None:
        return
    from vlm.training.optim import AdamWSettings, adamw

    if _target(node, "optimizer") is not adamw:
        return  # another optimizer: its unknown keys were checked, its values are its own
    values = {str(k): v for k, v in OmegaConf.to_container(node, resolve=True).items() if not str(k).startswith("_")}
    try:
        settings = AdamWSettings(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if settings.paged_8bit is True and accelerator != "cuda":
        raise ConfigError(
            f"optimizer.paged_8bit=True needs CUDA (bitsandbytes pages the optimizer state through it), "
            f"but the trainer runs on {accelerator}: use auto or false"
        )


def _check_callbacks(callbacks: DictConfig | None) -> None:
    """Build each callback once, so that its own checks run now (``ModelCheckpoint``'s, ...);
    those with an argument the run hands them (one without a default) are left out."""
    for name, node in (callbacks or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        key = f"callbacks.{name}"
        parameters = inspect.signature(_target(node, key)).parameters.values()
        handed = [p.name for p in parameters if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in node]
        if not handed:
            _dry_build(node, key)
