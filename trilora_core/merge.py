"""Weighted merges of TriLoRA layers and files into one canonical TriLoRA.

sum_i w_i (alpha_i / r_i) U_i diag(s_i) Vt_i is itself a product U diag(s) Vt of the
concatenated factors [U_1 .. U_n], [w_i (alpha_i / r_i) s_i], [Vt_1; ..; Vt_n]; canonicalizing
that concatenation is exact, and truncating its canonical form is the best approximation of
the sum at a lower rank (Eckart-Young).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .canonical import canonicalize, truncate
from .layer import TriLoRALayer, compute_dtype
from .suffixes import alias_key


def _check_weight(weight: float, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{where}: weights must be finite numbers, got {weight!r}")
    return float(weight)


def merge_layers(
    weighted: Sequence[tuple[TriLoRALayer, float]],
    rank: int | None = None,
    energy: float | None = None,
) -> TriLoRALayer:
    """The canonical layer whose delta W is sum(weight * delta W of layer).

    Exact while the rank is not cut (``rank`` None or at least the sum of the input ranks,
    ``energy`` None or 1); otherwise the optimal approximation, truncated as ``truncate``
    does. Directions shared by the inputs count once (rounding noise is dropped). Pairs with weight 0 are left out. The result is float32 (float64 when an input is
    float64) on the first layer's device, with alpha = its rank (scale 1).
    """
    if not weighted:
        raise ValueError("merge_layers: nothing to merge")
    pairs = [(layer, _check_weight(w, "merge_layers")) for layer, w in weighted]
    shape = pairs[0][0].weight_shape
    for layer, _ in pairs[1:]:
        if layer.weight_shape != shape:
            raise ValueError(
                f"merge_layers: layers adapt weights of different shapes: {list(shape)} and {list(layer.weight_shape)}"
            )
    pairs = [(layer, w) for layer, w in pairs if w != 0.0]
    if not pairs:
        raise ValueError("merge_layers: every weight is 0, so the merge is empty")
    work = torch.float64 if any(compute_dtype(layer.dtype) == torch.float64 for layer, _ in pairs) else torch.float32
    device = pairs[0][0].device
    with torch.no_grad():
        u = torch.cat([layer.u.detach().to(device=device, dtype=work) for layer, _ in pairs], dim=1)
        s = torch.cat([layer.s.detach().to(device=device, dtype=work) * (w * layer.scale) for layer, w in pairs])
        vt = torch.cat(
            [layer.vt.detach().to(device=device, dtype=work).reshape(layer.rank, -1) for layer, _ in pairs], dim=0
        )
    total_rank = s.shape[0]
    merged = canonicalize(
        TriLoRALayer(u=u, s=s, vt=vt.reshape(total_rank, *shape[1:]), alpha=float(total_rank))
    )
    # Directions the inputs share come out once; what is left of them is rounding noise (below
    # the numerical-rank tolerance of the largest input direction), which is never kept.
    tolerance = float(s.abs().max()) * max(vt.shape[1], u.shape[0]) * torch.finfo(work).eps
    numerical = max(1, int((merged.s > tolerance).sum()))
    if numerical < merged.rank:
        merged = truncate(merged, rank=numerical)
    return truncate(merged, rank=rank, energy=energy if energy is not None and energy < 1.0 else None)


def merge_files(
    sources: Sequence[tuple[Mapping[str, TriLoRALayer], float]],
    rank: int | None = None,
    energy: float | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, TriLoRALayer]:
    """{prefix: merged layer} over the union of the weights the sources adapt.

    A layer present in only some sources is the weighted sum of those. Entries that name the
    same weight in different conventions (``alias_key``), in one source or across sources, are
    that weight: their weighted deltas are added, under the first source's name. ``names`` label
    the sources in errors (default "input 1", "input 2", ...). Entries of one weight whose
    shapes disagree raise ValueError naming both.
    """
    if not sources:
        raise ValueError("merge: nothing to merge")
    names = list(names) if names is not None else [f"input {i + 1}" for i in range(len(sources))]
    if len(names) != len(sources):
        raise ValueError("merge: one name per source expected")
    weights = [_check_weight(w, "merge") for _, w in sources]
    if all(w == 0.0 for w in weights):
        raise ValueError("merge: every weight is 0, so the merge is empty")
    by_weight: dict[str, list[tuple[TriLoRALayer, float, str, str]]] = {}
    for (layers, _), weight, name in zip(sources, weights, names, strict=True):
        for prefix, layer in sorted(layers.items()):
            by_weight.setdefault(alias_key(prefix), []).append((layer, weight, name, prefix))
    merged: dict[str, TriLoRALayer] = {}
    for key in sorted(by_weight):
        entries = by_weight[key]
        first_layer, _, first_name, prefix = entries[0]
        for layer, _, name, other in entries[1:]:
            if layer.weight_shape != first_layer.weight_shape:
                where = f"layer {prefix}" if other == prefix else f"layers {prefix} and {other}, one weight,"
                raise ValueError(
                    f"merge: {where} {'has' if other == prefix else 'have'} shape {list(first_layer.weight_shape)} "
                    f"in {first_name} but {list(layer.weight_shape)} in {name}; were they made for different base models?"
                )
        live = [(layer, w) for layer, w, _, _ in entries if w != 0.0]
        if live:
            merged[prefix] = merge_layers(live, rank=rank, energy=energy)
    return merged


def alias_groups(layers: Mapping[str, TriLoRALayer]) -> list[list[str]]:
    """Groups (sorted) of a file's prefixes that name one weight in different conventions (alias_key)."""
    groups: dict[str, list[str]] = {}
    for prefix in sorted(layers):
        groups.setdefault(alias_key(prefix), []).append(prefix)
    return [g for g in groups.values() if len(g) > 1]


def fold_aliases(layers: Mapping[str, TriLoRALayer]) -> dict[str, TriLoRALayer]:
    """The layers with the entries of each alias group (``alias_groups``) replaced by one layer
    under the first name, whose delta is their sum (exact); other layers as they are."""
    out = dict(layers)
    for group in alias_groups(layers):
        out[group[0]] = merge_layers([(out.pop(p), 1.0) for p in group])
    return dict(sorted(out.items()))
