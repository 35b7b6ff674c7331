"""Input shapes as users give them: `x=1,3,224,224` pins every dimension, `ids=1..8,1..128` lets a
dimension vary at run time inside an inclusive range (stdlib only: the CLI, the compiler and bench share it).
"""

from __future__ import annotations

from forgeml.errors import InvalidInput

Dim = int | tuple[int, int]  # a size, or an inclusive range (low, high) for a dimension that varies
InputShapes = dict[str, tuple[Dim, ...]]


def parse_dim(text: str, where: str) -> Dim:
    """`128` -> 128; `1..128` -> (1, 128); `8..8` -> 8. InvalidInput naming `where` otherwise."""
    low, sep, high = text.strip().partition("..")
    try:
        if not sep:
            size = int(low)
            if size < 0:
                raise InvalidInput(f"{where}: dimensions must be sizes (0 or more), got {size}")
            return size
        lo, hi = int(low), int(high)
    except ValueError:
        raise InvalidInput(f"{where}: '{text}' is neither a size nor a range A..B (e.g. 1..128)") from None
    if lo < 1 or hi < lo:
        raise InvalidInput(f"{where}: range {lo}..{hi} must satisfy 1 <= A <= B")
    return lo if lo == hi else (lo, hi)


def parse_input_shapes(items: tuple[str, ...] | list[str], option: str = "--input-shape") -> InputShapes:
    """`NAME=D1,D2,...` items (each D a size or a range A..B) -> name -> dims."""
    shapes: InputShapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        if not sep or not name or not dims:
            raise InvalidInput(f"{option} '{item}' is not NAME=D1,D2,... (e.g. x=1,3,224,224 or ids=1..8,1..128)")
        shapes[name] = tuple(parse_dim(d, f"{option} '{item}'") for d in dims.split(","))
    return shapes


def is_dynamic(shape: tuple[Dim, ...]) -> bool:
    """Whether any dimension of `shape` is a range."""
    return any(isinstance(d, tuple) for d in shape)


def format_dim(dim: Dim) -> str:
    """The CLI's spelling of a dimension: `128` or `1..128`."""
    return f"{dim[0]}..{dim[1]}" if isinstance(dim, tuple) else str(dim)


def to_json(shapes: InputShapes) -> dict[str, list]:
    """JSON form for the manifest: a size stays a number, a range becomes [low, high]."""
    return {k: [list(d) if isinstance(d, tuple) else d for d in v] for k, v in shapes.items()}


def dimension_variables(specs) -> dict[str, tuple[int, int]]:
    """Variable -> (low, high) over the `dynamic` axes of TensorSpecs (forgeml.runtime.artifact)."""
    return {dim.variable: (dim.min, dim.max) for spec in specs for dim in spec.dynamic}


def check_points(variables: dict[str, tuple[int, int]]) -> list[dict[str, int]]:
    """The points of the range verification runs at: every variable at its minimum, at an uneven size in
    between (3/5 of the way: 77 in 1..128, 5 in 1..8, so tails of vector loops run), and at its maximum."""
    between = {k: lo + (hi - lo) * 3 // 5 for k, (lo, hi) in variables.items()}
    points = [{k: lo for k, (lo, _) in variables.items()}, between, {k: hi for k, (_, hi) in variables.items()}]
    return [p for n, p in enumerate(points) if p not in points[:n]]


def concrete_shapes(specs, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Each input's shape with its dynamic axes set from `values` (variable -> size)."""
    out = {}
    for spec in specs:
        shape = list(spec.shape)
        for dim in spec.dynamic:
            shape[dim.axis] = values[dim.variable]
        out[spec.name] = tuple(shape)
    return out
