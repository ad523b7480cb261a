"""The kernels' settings objects: frozen, defaulting to the tuned launch choices, and refusing when made a value
their kernels cannot launch with, naming the field."""

import dataclasses

import pytest

from vlm.kernels._row_tiling import DEFAULT_ROW_TILING, RowTiling
from vlm.kernels.qlora.thin_products import DEFAULT_THIN_TILING, ThinTiling
from vlm.kernels.qlora_linear import DEFAULT_QLORA_TUNING, QLoRATuning
from vlm.kernels.rope import DEFAULT_ROPE_TILING, RopeTiling


def test_the_defaults_are_the_tuned_launch_choices():
    assert DEFAULT_ROW_TILING == RowTiling(tile_elements=2048, backward_warps_per_sm=16)
    assert DEFAULT_ROPE_TILING == RopeTiling(tile_elements=1024, heads_per_program=4, num_warps=4)
    assert DEFAULT_THIN_TILING == ThinTiling(
        block_m=32, block_n=512, num_warps=4, programs_per_sm=3, num_stages=3, max_rank=32
    )
    assert DEFAULT_QLORA_TUNING == QLoRATuning(
        overlap_on_side_stream=True, lora_inside_gemm_min_widening=1.0, lora_inside_gemm_max_rank=32,
        thin_products=DEFAULT_THIN_TILING, host_bound_max_rows=4096,
    )


@pytest.mark.parametrize(
    "settings", [DEFAULT_ROW_TILING, DEFAULT_ROPE_TILING, DEFAULT_THIN_TILING, DEFAULT_QLORA_TUNING], ids=lambda s: type(s).__name__
)
def test_settings_cannot_be_changed_once_made(settings):
    field = dataclasses.fields(settings)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, field, getattr(settings, field))
    assert dataclasses.replace(settings) == settings  # a changed copy is how a sweep gets another one


@pytest.mark.parametrize(
    "kind, values",
    [
        (RowTiling, dict(tile_elements=3000)),
        (RowTiling, dict(backward_warps_per_sm=0)),
        (RopeTiling, dict(tile_elements=1000)),
        (RopeTiling, dict(heads_per_program=0)),
        (RopeTiling, dict(num_warps=6)),
        (ThinTiling, dict(block_m=8)),
        (ThinTiling, dict(block_n=500)),
        (ThinTiling, dict(num_warps=3)),
        (ThinTiling, dict(num_stages=0)),
        (ThinTiling, dict(max_rank=-1)),
        (QLoRATuning, dict(lora_inside_gemm_min_widening=-1.0)),
        (QLoRATuning, dict(lora_inside_gemm_max_rank=-1)),
        (QLoRATuning, dict(host_bound_max_rows=-1)),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else next(iter(value)),
)
def test_a_value_the_kernels_cannot_launch_with_is_refused_naming_its_field(kind, values):
    field = next(iter(values))
    with pytest.raises(ValueError, match=rf"{kind.__name__}\.{field} must be"):
        kind(**values)
