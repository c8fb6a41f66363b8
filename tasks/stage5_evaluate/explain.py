"""Image-level compositional explanations of units (Mu & Andreas, NeurIPS 2020).

A unit is explained by the logical formula over concepts (classes and their WordNet
hypernyms) whose image set best matches the images on which the unit fires, measured by
intersection over union (IoU).

Because every image carries exactly one class, every formula denotes a set of classes and its
IoU with a unit follows from two per-class counts: ``hits[t]`` (active images of class t) and
``sizes[t]`` (images of class t):

    IoU(S) = sum_{t in S} hits[t] / (sum_t hits[t] + sum_{t in S} (sizes[t] - hits[t]))

Formulas are therefore class bitmasks, and the beam search works on counts only: extending a
beam by every concept under every operator costs one small matrix product per unit, and the
IoUs of all candidates of a whole layer are computed at once. The per-class counts can also be
reduced out of core elsewhere and handed to `explain_counts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polysemantic_disentangle.tasks.defaults import (
    EXPLAIN_ACTIVE_QUANTILE,
    EXPLAIN_BEAM_WIDTH,
    EXPLAIN_MAX_FORMULA_LENGTH,
    EXPLAIN_MIN_ACTIVE_IMAGES,
    EXPLAIN_MIN_CONCEPT_IMAGES,
    EXPLAIN_UNIT_CHUNK,
)

# Mu & Andreas (2020); every search uses all of them unless told otherwise.
OPERATORS: tuple[str, ...] = ("OR", "AND", "AND NOT")

# float32 products of 0/1 concept masks with integer counts are exact below 2**24.
_FLOAT32_EXACT = 2**24


@dataclass(frozen=True)
class Formula:
    """A left-deep formula ``((c0 op1 c1) op2 c2) ...`` with its class set and IoU.

    ``classes`` is the set of class ids the formula denotes; ``iou`` its IoU with the unit it
    was found for.
    """

    concepts: tuple[str, ...]
    operators: tuple[str, ...]
    classes: frozenset[int]
    iou: float

    def __post_init__(self) -> None:
        if len(self.operators) != len(self.concepts) - 1:
            raise ValueError("a formula needs exactly one operator between two concepts")
        unknown = set(self.operators) - set(OPERATORS)
        if unknown:
            raise ValueError(f"unknown operators {sorted(unknown)}; known: {OPERATORS}")

    @property
    def length(self) -> int:
        return len(self.concepts)

    def __str__(self) -> str:
        text = self.concepts[0]
        for i, (op, name) in enumerate(zip(self.operators, self.concepts[1:], strict=True)):
            # Parenthesise the left operand once it is itself compound, so precedence is explicit.
            left = f"({text})" if i > 0 else text
            text = f"{left} {op} {name}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain data for reports and JSON."""
        return {
            "formula": str(self),
            "concepts": list(self.concepts),
            "operators": list(self.operators),
            "classes": sorted(self.classes),
            "iou": self.iou,
            "length": self.length,
        }


@dataclass(frozen=True)
class Explanation:
    """The search result for one unit.

    ``best``: highest IoU over all lengths (ties go to the shorter formula).
    ``best_by_length[k]``: best formula of length k + 1 whose set of images no shorter formula
    met by the search denotes; shorter than the maximum length when the search ran out of new
    sets.
    ``beam``: the final beam, best first. ``threshold``: activation above which the unit counts
    as active (None when the search started from counts); ``n_active``: number of active
    images.
    """

    unit: int
    best: Formula
    best_by_length: tuple[Formula, ...]
    beam: tuple[Formula, ...]
    threshold: float | None
    n_active: int

    @property
    def best_single(self) -> Formula:
        return self.best_by_length[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "best": self.best.to_dict(),
            "best_single": self.best_single.to_dict(),
            "best_by_length": [f.to_dict() for f in self.best_by_length],
            "beam": [f.to_dict() for f in self.beam],
            "threshold": self.threshold,
            "n_active": self.n_active,
        }


# ---------------------------------------------------------------------------------------
# Binarisation and per-class counts


def default_quantile(n_classes: int) -> float:
    """Activation quantile whose top set is as large as a typical concept class.

    The unit mask should be comparable in size to the masks it is matched against: with
    n_images / n_classes images per class on average, the top fraction 1 / n_classes of the
    images are active. (Mu & Andreas use the top 0.5 %, quantile 0.995, for pixel masks.)
    """
    if n_classes < 1:
        raise ValueError("n_classes must be positive")
    return 1.0 - 1.0 / n_classes


def present_quantile(labels: np.ndarray, min_active: int = EXPLAIN_MIN_ACTIVE_IMAGES) -> float:
    """Activation quantile for the images actually explained: the top set holds about as many
    images as one PRESENT class has on average (n_images / classes with images), and never
    fewer than ``min_active`` images.

    The model's class count is the wrong base on a subset: 1 - 1/1000 on 750 ImageNet photos
    leaves one active image per unit, and every unit's IoU is then that image's class, 1/n.
    With one image per class the floor makes a unit active on a few images, so that what they
    share (a hypernym) can explain it. Returns 0 for no images.
    """
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    n = int(labels.size)
    if n == 0:
        return 0.0
    present = int(np.unique(labels).size)
    target = min(n, max(int(min_active), int(round(n / present))))
    return float(1.0 - target / n)


def activation_thresholds(activations: np.ndarray, quantile: float) -> np.ndarray:
    """Per-unit threshold: the ``quantile`` of each column of (n_images, n_units)."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError("quantile must be in [0, 1)")
    return np.quantile(np.asarray(activations), quantile, axis=0)


def binarise(activations: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Active = strictly above the threshold, so a unit that is constant (e.g. dead after a
    ReLU) marks no image instead of all of them."""
    return np.asarray(activations) > np.asarray(thresholds)


def class_counts(
    active: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class counts from an (n_images, n_units) boolean mask.

    Returns ``hits`` (n_units, n_classes): active images per class, and ``sizes``
    (n_classes,): images per class.
    """
    active = np.asarray(active, dtype=bool)
    labels = np.asarray(labels)
    if active.ndim != 2 or labels.shape != (active.shape[0],):
        raise ValueError("active must be (n_images, n_units) and labels (n_images,)")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError("labels must lie in [0, n_classes)")
    sizes = np.bincount(labels, minlength=n_classes).astype(np.int64)
    hits = np.zeros((n_classes, active.shape[1]), dtype=np.int64)
    if labels.size:
        # One segmented sum over label-sorted rows: O(n_images * n_units), no one-hot product.
        order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[order], return_index=True)
        hits[present] = np.add.reduceat(active[order].astype(np.int64), starts, axis=0)
    return hits.T.copy(), sizes


def concept_matrix(
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]], n_classes: int
) -> tuple[tuple[str, ...], np.ndarray]:
    """Concept names and their (n_concepts, n_classes) boolean class masks.

    Empty concepts are dropped, and of several concepts denoting the same class set only the
    first in the mapping's order is kept (no formula could tell them apart). The mapping's order
    is also the tie-break order of the search: put the names you prefer first.
    """
    names: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[bytes] = set()
    for name, classes in concepts.items():
        ids = np.fromiter((int(c) for c in classes), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
            raise ValueError(f"concept {name!r} has class ids outside [0, {n_classes})")
        row = np.zeros(n_classes, dtype=bool)
        row[ids] = True
        key = row.tobytes()
        if not ids.size or key in seen:
            continue
        seen.add(key)
        names.append(str(name))
        rows.append(row)
    if not rows:
        raise ValueError("no non-empty concept")
    return tuple(names), np.stack(rows)


# ---------------------------------------------------------------------------------------
# IoU of class sets


def iou_from_counts(class_mask: np.ndarray, hits: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """IoU of class set(s) with unit(s), from counts.

    ``class_mask`` (..., n_classes) bool; ``hits`` (..., n_classes); ``sizes`` (n_classes,).
    An empty union (unit never active and formula covering no image) has IoU 0.
    """
    mask = np.asarray(class_mask, dtype=bool)
    hits = np.asarray(hits, dtype=np.float64)
    inter = (hits * mask).sum(-1)
    union = hits.sum(-1) + ((np.asarray(sizes, dtype=np.float64) - hits) * mask).sum(-1)
    return _safe_iou(inter, union)


def _safe_iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(np.shape(inter), np.shape(union)), dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def formula_class_mask(
    concept_names: Sequence[str],
    operators: Sequence[str],
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]],
    n_classes: int,
) -> np.ndarray:
    """The class set of a left-deep formula, evaluated from the concept dict directly."""
    if len(operators) != len(concept_names) - 1:
        raise ValueError("a formula needs exactly one operator between two concepts")

    def mask(name: str) -> np.ndarray:
        out = np.zeros(n_classes, dtype=bool)
        out[list(concepts[name])] = True
        return out

    result = mask(concept_names[0])
    for op, name in zip(operators, concept_names[1:], strict=True):
        result = _apply(op, result, mask(name))
    return result


def _apply(op: str, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    if op == "OR":
        return left | right
    if op == "AND":
        return left & right
    if op == "AND NOT":
        return left & ~right
    raise ValueError(f"unknown operator {op!r}; known: {OPERATORS}")


# ---------------------------------------------------------------------------------------
# Entry points


def explain_units(
    activations: np.ndarray,
    labels: np.ndarray,
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]],
    n_classes: int,
    *,
    quantile: float | None = EXPLAIN_ACTIVE_QUANTILE,
    beam_width: int = EXPLAIN_BEAM_WIDTH,
    max_length: int = EXPLAIN_MAX_FORMULA_LENGTH,
    operators: Sequence[str] = OPERATORS,
    min_concept_images: int = EXPLAIN_MIN_CONCEPT_IMAGES,
) -> list[Explanation]:
    """Explain every unit of a layer.

    ``activations`` (n_images, n_units): one value per image and unit (the caller reduces
    space, e.g. by max or mean); ``labels`` (n_images,) class ids; ``concepts`` maps a name
    to its class ids. ``quantile`` None means `present_quantile(labels)`: about one present
    class's worth of images active, at least a few.
    """
    acts = np.asarray(activations)
    if acts.ndim != 2:
        raise ValueError("activations must be (n_images, n_units)")
    q = present_quantile(labels) if quantile is None else quantile
    thresholds = activation_thresholds(acts, q)
    hits, sizes = class_counts(binarise(acts, thresholds), labels, n_classes)
    return explain_counts(
        hits, sizes, concepts, beam_width=beam_width, max_length=max_length,
        operators=operators, thresholds=thresholds, min_concept_images=min_concept_images,
    )


def explain_unit(
    activations: np.ndarray,
    labels: np.ndarray,
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]],
    n_classes: int,
    **kwargs: Any,
) -> Explanation:
    """Explain one unit from its (n_images,) activations; options as `explain_units`."""
    acts = np.asarray(activations)
    if acts.ndim != 1:
        raise ValueError("activations must be (n_images,)")
    return explain_units(acts[:, None], labels, concepts, n_classes, **kwargs)[0]


# ---------------------------------------------------------------------------------------
# Beam search


@dataclass
class _Node:
    """A formula during the search: concept/operator indices, class mask and its counts.

    ``key`` identifies the set of images the formula denotes (its classes that have images):
    formulas differing only in classes without images cannot be told apart by the data.
    """

    concepts: tuple[int, ...]
    operators: tuple[int, ...]
    mask: np.ndarray
    inter: float
    false_pos: float  # images in the set but not active: sum over the set of sizes - hits
    iou: float
    key: bytes


def explain_counts(
    hits: np.ndarray,
    sizes: np.ndarray,
    concepts: Mapping[str, frozenset[int] | set[int] | Sequence[int]],
    *,
    beam_width: int = EXPLAIN_BEAM_WIDTH,
    max_length: int = EXPLAIN_MAX_FORMULA_LENGTH,
    operators: Sequence[str] = OPERATORS,
    thresholds: np.ndarray | None = None,
    unit_chunk: int = EXPLAIN_UNIT_CHUNK,
    min_concept_images: int = EXPLAIN_MIN_CONCEPT_IMAGES,
) -> list[Explanation]:
    """Beam search for every unit given per-class counts ``hits`` (n_units, n_classes) and
    ``sizes`` (n_classes,).

    As in Mu & Andreas: the beam starts with the ``beam_width`` best single concepts; each step
    extends the formulas of the current length by every concept under every operator, and the
    beam becomes the best ``beam_width`` of old beam and new formulas. Only formulas added in
    the last step are extended: older ones were already extended, and their extensions lost
    to a beam that has only improved since. A formula denoting a set of images that the search
    already met, or no image at all, is dropped, so the shorter formula survives. Ties in IoU
    go to the shorter formula, then to the earlier beam entry, operator (in ``operators``
    order) and concept (in the mapping's order).

    Concepts with fewer than ``min_concept_images`` images are left out (unless none has as
    many): a concept of one image matches whichever unit is active on that image, so with one
    image per class every unit would read as an OR of the classes of its top images, and
    nothing they share could win.
    """
    hits = np.asarray(hits)
    sizes = np.asarray(sizes)
    if hits.ndim != 2 or sizes.shape != (hits.shape[1],):
        raise ValueError("hits must be (n_units, n_classes) and sizes (n_classes,)")
    if np.any(hits < 0) or np.any(hits > sizes):
        raise ValueError("need 0 <= hits <= sizes")
    if beam_width < 1 or max_length < 1:
        raise ValueError("beam_width and max_length must be positive")
    ops = tuple(operators)
    if not ops or set(ops) - set(OPERATORS) or len(set(ops)) != len(ops):
        raise ValueError(f"operators must be distinct names from {OPERATORS}")
    names, cmat = concept_matrix(concepts, hits.shape[1])
    if not np.any(cmat @ (sizes > 0)):
        raise ValueError("no concept covers any image")
    images_per_concept = cmat.astype(np.int64) @ sizes.astype(np.int64)
    big = images_per_concept >= min_concept_images
    if big.any() and not big.all():
        names = tuple(n for n, b in zip(names, big, strict=True) if b)
        cmat = cmat[big]
    n_units = hits.shape[0]
    thr = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)

    dtype = np.float32 if sizes.sum() < _FLOAT32_EXACT else np.float64
    cmat_t = np.ascontiguousarray(cmat.T.astype(dtype))  # (n_classes, n_concepts)
    results: list[Explanation] = []
    for start in range(0, n_units, unit_chunk):
        chunk = slice(start, min(start + unit_chunk, n_units))
        found = _search_chunk(hits[chunk], sizes, cmat, cmat_t, beam_width, max_length, ops)
        for offset, (by_length, beam) in enumerate(found):
            unit = start + offset
            by_length_f = tuple(_to_formula(n, names, ops) for n in by_length)
            # min() keeps the first of equal keys: the shorter formula wins ties.
            best = min(by_length_f, key=lambda f: -f.iou)
            results.append(
                Explanation(
                    unit=unit,
                    best=best,
                    best_by_length=by_length_f,
                    beam=tuple(_to_formula(n, names, ops) for n in beam),
                    threshold=None if thr is None else float(thr[unit]),
                    n_active=int(hits[unit].sum()),
                )
            )
    return results


def _to_formula(node: _Node, names: tuple[str, ...], ops: tuple[str, ...]) -> Formula:
    return Formula(
        concepts=tuple(names[i] for i in node.concepts),
        operators=tuple(ops[i] for i in node.operators),
        classes=frozenset(int(t) for t in np.flatnonzero(node.mask)),
        iou=float(node.iou),
    )


def _search_chunk(
    hits: np.ndarray,
    sizes: np.ndarray,
    cmat: np.ndarray,
    cmat_t: np.ndarray,
    beam_width: int,
    max_length: int,
    ops: tuple[str, ...],
) -> list[tuple[list[_Node], list[_Node]]]:
    """The search for a block of units: candidate counts and IoUs are computed for the whole
    block at once; only picking the new beam from the ranked candidates runs per unit."""
    n_units, n_classes = hits.shape
    dtype = cmat_t.dtype
    covered = sizes > 0

    def key(mask: np.ndarray) -> bytes:
        return np.packbits(mask & covered).tobytes()

    hits_f = hits.astype(dtype)
    false_f = (sizes - hits).astype(dtype)
    total = hits.sum(1).astype(np.float64)  # (U,)
    inter1 = (hits_f @ cmat_t).astype(np.float64)  # (U, N)
    false1 = (false_f @ cmat_t).astype(np.float64)
    iou1 = _safe_iou(inter1, total[:, None] + false1)
    iou1[:, ~(cmat @ covered)] = -np.inf  # a concept without images matches nothing
    concept_keys = [key(row) for row in cmat]

    by_length: list[list[_Node]] = []
    beams: list[list[_Node]] = []
    seen: list[set[bytes]] = []
    for u in range(n_units):
        beam: list[_Node] = []
        met: set[bytes] = set()
        for c in _sorted_candidates(iou1[u], beam_width):
            if concept_keys[c] in met:  # same images as a concept earlier in the mapping
                continue
            met.add(concept_keys[c])
            beam.append(
                _Node((c,), (), cmat[c], inter1[u, c], false1[u, c], iou1[u, c], concept_keys[c])
            )
            if len(beam) == beam_width:
                break
        beams.append(beam)
        by_length.append(beam[:1])
        seen.append(set(concept_keys))

    frontier = [list(b) for b in beams]  # formulas of the current length, to extend
    for _ in range(max_length - 1):
        if not any(frontier):
            break
        masks = np.zeros((n_units, beam_width, n_classes), dtype=bool)
        inter_b = np.zeros((n_units, beam_width))
        false_b = np.zeros((n_units, beam_width))
        valid = np.zeros((n_units, beam_width), dtype=bool)
        for u, nodes in enumerate(frontier):
            for b, node in enumerate(nodes):
                masks[u, b], inter_b[u, b], false_b[u, b] = node.mask, node.inter, node.false_pos
                valid[u, b] = True
        inter_in, false_in = _counts_inside(masks, hits_f, false_f, cmat_t)  # (U, B, N)
        shape = (n_units, beam_width, len(ops), inter1.shape[1])
        inter_c, false_c = np.empty(shape), np.empty(shape)  # (U, B, n_ops, N)
        for i, op in enumerate(ops):
            if op == "OR":  # f | c = f + (c outside f)
                np.subtract(inter_b[..., None] + inter1[:, None, :], inter_in, out=inter_c[:, :, i])
                np.subtract(false_b[..., None] + false1[:, None, :], false_in, out=false_c[:, :, i])
            elif op == "AND":  # f & c = c inside f
                inter_c[:, :, i], false_c[:, :, i] = inter_in, false_in
            else:  # f & ~c = f - (c inside f)
                np.subtract(inter_b[..., None], inter_in, out=inter_c[:, :, i])
                np.subtract(false_b[..., None], false_in, out=false_c[:, :, i])
        iou_c = _safe_iou(inter_c, total[:, None, None, None] + false_c)
        # Every candidate contains f or is contained in it, so it denotes f's images again
        # exactly when it has as many images; those (the bulk: f AND NOT c for every c
        # disjoint from f, ...) and candidates with no image are dropped here, vectorised.
        n_images_c = inter_c + false_c
        n_images_b = (inter_b + false_b)[..., None, None]
        iou_c[(n_images_c == n_images_b) | (n_images_c <= 0)] = -np.inf
        # Likewise f OR c (a superset of c) and f AND c (a subset of c) denote the single
        # concept c again when they have as many images as c: f within c, c within f.
        n_images_1 = (inter1 + false1)[:, None, :]
        for i, op in enumerate(ops):
            if op in ("OR", "AND"):
                iou_c[:, :, i][n_images_c[:, :, i] == n_images_1] = -np.inf
        iou_c[~valid] = -np.inf
        iou_c = iou_c.reshape(n_units, -1)
        inter_c = inter_c.reshape(n_units, -1)
        false_c = false_c.reshape(n_units, -1)

        new_frontier: list[list[_Node]] = []
        for u in range(n_units):
            fresh = _fresh_candidates(
                iou_c[u], inter_c[u], false_c[u], frontier[u], cmat, ops, key, seen[u],
                beam_width,
            )
            if fresh:
                by_length[u].append(fresh[0])
            # Old members are shorter, so they must win ties: sorted() is stable.
            merged = sorted(beams[u] + fresh, key=lambda n: -n.iou)[:beam_width]
            old = {m.key for m in beams[u]}
            added = [n for n in merged if n.key not in old]
            seen[u].update(n.key for n in added)
            beams[u] = merged
            new_frontier.append(added)
        frontier = new_frontier
    return list(zip(by_length, beams, strict=True))


def _counts_inside(
    masks: np.ndarray, hits: np.ndarray, false_pos: np.ndarray, cmat_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Active and inactive image counts of every concept c inside every formula f:
    sum over classes t in f and c of hits[t] (resp. sizes[t] - hits[t]). All three operators
    follow from them.

    Per unit, only the classes some beam formula contains enter the product: beam formulas
    are mostly small class sets, so this is far cheaper than a dense product over all classes.
    """
    n_units, beam_width, _ = masks.shape
    out = np.zeros((n_units, 2 * beam_width, cmat_t.shape[1]), dtype=np.float64)
    for u in range(n_units):
        cols = np.flatnonzero(masks[u].any(0))
        if cols.size:
            sub = masks[u][:, cols]
            weights = np.concatenate([sub * hits[u, cols], sub * false_pos[u, cols]])
            out[u] = weights @ cmat_t[cols]
    return out[:, :beam_width], out[:, beam_width:]


def _sorted_candidates(scores: np.ndarray, k: int) -> Iterator[int]:
    """Candidate indices best first (ties to the lower index), finite scores only.

    Sorting every candidate of every unit would dominate the run time and usually a handful
    suffice, so sort blocks of growing size, each holding all ties of its lowest score.
    """
    remaining = np.flatnonzero(np.isfinite(scores))  # ascending, so stable sorts break ties
    while remaining.size:
        k = min(k, remaining.size)
        values = scores[remaining]
        cut = np.partition(values, values.size - k)[values.size - k]
        take = values >= cut
        block = remaining[take]
        yield from (int(i) for i in block[np.argsort(-values[take], kind="stable")])
        remaining = remaining[~take]
        k *= 8


def _fresh_candidates(
    scores: np.ndarray,
    inter: np.ndarray,
    false_pos: np.ndarray,
    frontier: list[_Node],
    cmat: np.ndarray,
    ops: tuple[str, ...],
    key: Callable[[np.ndarray], bytes],
    seen: set[bytes],
    beam_width: int,
) -> list[_Node]:
    """The best ``beam_width`` candidates denoting image sets not met before, best first.

    Candidate index = (frontier slot, operator, concept) in C order.
    """
    n_concepts = cmat.shape[0]
    per_slot = len(ops) * n_concepts
    fresh: list[_Node] = []
    keys: set[bytes] = set()
    for idx in _sorted_candidates(scores, 2 * beam_width + 8):
        slot, rest = divmod(idx, per_slot)
        op, c = divmod(rest, n_concepts)
        parent = frontier[slot]
        mask = _apply(ops[op], parent.mask, cmat[c])
        k = key(mask)
        if k in seen or k in keys:
            continue
        keys.add(k)
        fresh.append(
            _Node(
                parent.concepts + (c,), parent.operators + (op,), mask,
                float(inter[idx]), float(false_pos[idx]), float(scores[idx]), k,
            )
        )
        if len(fresh) == beam_width:
            break
    return fresh
