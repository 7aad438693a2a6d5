"""A thread's position in a kernel's `source=`, as CUDA and Metal name it.

MLX declares a Metal attribute (thread_position_in_threadgroup, ...) only when its name appears
in `source`, so every kernel's source starts with a prologue naming the positions it reads:
`prologue(backend, at_lane="thread.x", at_tg_x="threadgroup.x", ...)`.
"""

from __future__ import annotations

# backend -> {scope: the builtin}: "thread" the index in the threadgroup, "threadgroup" the
# threadgroup's index in the grid.
_BUILTINS = {
    "cuda": {"thread": "threadIdx", "threadgroup": "blockIdx"},
    "metal": {
        "thread": "thread_position_in_threadgroup",
        "threadgroup": "threadgroup_position_in_grid",
    },
}


def prologue(backend: str, **positions: str) -> str:
    """`const unsigned name = <builtin>;` for each name=position of backend "cuda" or "metal",
    in the order given, a position "thread.x" (.y, .z) or "threadgroup.x" (.y, .z); after an
    empty line, as the kernel sources start."""
    builtins = _BUILTINS[backend]
    lines = []
    for name, position in positions.items():
        scope, _, axis = position.partition(".")
        if scope not in builtins or axis not in ("x", "y", "z"):
            raise ValueError(f"position {position!r}: thread.x, .y, .z or threadgroup.x, .y, .z")
        lines.append(f"  const unsigned {name} = {builtins[scope]}.{axis};\n")
    return "\n" + "".join(lines)
