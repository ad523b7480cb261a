"""Checks the frozen settings objects (``RowTiling``, ``RopeTiling``, ``ThinTiling``, ``QLoRATuning``) run in
``__post_init__``: a value a kernel cannot launch with fails where the settings are made, naming its field."""


def require_power_of_two(settings: object, *fields: str, at_least: int = 1) -> None:
    """Each named field of ``settings`` is a power of two of at least ``at_least`` (``tl.arange`` sizes, warps)."""
    for field in fields:
        value = getattr(settings, field)
        if value < at_least or value & (value - 1):
            name = f"{type(settings).__name__}.{field}"
            raise ValueError(f"{name} must be a power of two of at least {at_least}, got {value}")


def require_at_least(settings: object, minimum: float, *fields: str) -> None:
    """Each named field of ``settings`` is at least ``minimum``."""
    for field in fields:
        value = getattr(settings, field)
        if not value >= minimum:
            raise ValueError(f"{type(settings).__name__}.{field} must be at least {minimum}, got {value}")
