"""The channel-first norms' set table, ``[channel_first]`` (kernels/channel_first.py: x walked as [N, C, S],
normalised over C): a ``shapes`` list of [C, N, S] triples, listed rather than crossed because real models'
shapes are triples, not a cross product."""
from __future__ import annotations

from kernels.channel_first import ChannelFirstProblem

from . import SetFormat


def parse(file: str, table: dict) -> dict:
    """The (C, N, S) triples, in file order, each once."""
    if set(table) != {"shapes"}:
        raise ValueError(f"{file}: [channel_first] must hold exactly `shapes`, a list of [C, N, S]")
    shapes = table["shapes"]
    if not isinstance(shapes, list) or not shapes:
        raise ValueError(f"{file}: channel_first.shapes must be a non-empty list of [C, N, S]")
    for v in shapes:
        if not (isinstance(v, list) and len(v) == 3 and all(type(d) is int for d in v) and min(v) >= 1):
            raise ValueError(f"{file}: channel_first.shapes entries are [C, N, S] integers >= 1, got {v!r}")
    triples = [tuple(v) for v in shapes]
    if len(set(triples)) != len(triples):
        raise ValueError(f"{file}: channel_first.shapes has duplicate entries")
    return {"shapes": triples}


def problems(ps, op: str, in_dtype: str, out_format: str, scale_layout: str) -> list:
    if scale_layout != "rowmajor":
        raise ValueError("channel-first ops write no FP4 block scales (scale_layout rowmajor)")
    return [ChannelFirstProblem.from_op(op, n, c, s, in_dtype, out_format) for c, n, s in ps.shapes]


SET_FORMAT = SetFormat(table="channel_first", parse=parse, problems=problems)
