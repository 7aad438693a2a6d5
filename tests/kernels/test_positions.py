"""kernels/positions.py: the prologue that names a thread's position, per backend."""

import pytest

from qwen35_mlx.kernels.positions import prologue


def test_prologue_names_each_position_in_order():
    cuda = prologue("cuda", lane="thread.x", block="threadgroup.z")
    assert cuda == "\n  const unsigned lane = threadIdx.x;\n  const unsigned block = blockIdx.z;\n"
    metal = prologue("metal", block="threadgroup.y", lane="thread.x").splitlines()
    assert metal == [
        "",
        "  const unsigned block = threadgroup_position_in_grid.y;",
        "  const unsigned lane = thread_position_in_threadgroup.x;",
    ]


@pytest.mark.parametrize("position", ["thread.w", "grid.x", "thread"])
def test_prologue_rejects_an_unknown_position(position):
    with pytest.raises(ValueError, match="position"):
        prologue("metal", lane=position)
