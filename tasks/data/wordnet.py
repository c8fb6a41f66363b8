"""WordNet 3.0 lookups for class similarity and compositional-explanation concepts.

Everything here takes a wnid (``n02084071``) or a synset name (``dog.n.01``) and reads the
corpus that ``polysemantic_disentangle.tasks.data.wordnet_corpus`` provisions and verifies.
Similarities of nouns go through per-synset caches (ancestor distances, depths) instead of
nltk's per-call graph walks: a 1,000-class model names hundreds of thousands of class pairs.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nltk.corpus.reader.wordnet import Synset, WordNetError

from polysemantic_disentangle.tasks.data.wordnet_corpus import wordnet

_NOUN_MAX_DEPTH = 19  # deepest noun in WordNet 3.0's single-rooted noun taxonomy
_WNID_RE = re.compile(r"^([nvasr])(\d{8})$")
_SYNSET_NAME_RE = re.compile(r"^.+\.[nvasr]\.\d+$")


# --------------------------------------------------------------------------- lookups


def synset_for_wnid(wnid: str) -> Synset:
    """``'n03196217'`` -> the Synset at that part of speech and WordNet 3.0 offset."""
    m = _WNID_RE.match(wnid.strip())
    if not m:
        raise ValueError(f"not a WordNet id like 'n03196217': {wnid!r}")
    with warnings.catch_warnings():
        # nltk warns and returns None for an unknown offset; the error below says it instead.
        warnings.filterwarnings("ignore", message="No WordNet synset found")
        synset = wordnet().synset_from_pos_and_offset(m.group(1), int(m.group(2)))
    if synset is None:
        raise WordNetError(f"no WordNet 3.0 synset at {wnid!r}")
    return synset


def to_synset(ref: str | Synset) -> Synset:
    """A Synset from a wnid (``n02084071``), a synset name (``dog.n.01``) or a Synset."""
    if isinstance(ref, Synset):
        return ref
    ref = ref.strip()
    if _WNID_RE.match(ref):
        return synset_for_wnid(ref)
    if _SYNSET_NAME_RE.match(ref):
        return wordnet().synset(ref)
    raise ValueError(f"not a wnid or synset name: {ref!r}")


def wnid_of(synset: Synset) -> str:
    """The wnid of a Synset (``n%08d`` from its part of speech and offset)."""
    return f"{synset.pos()}{synset.offset():08d}"


def _mapping(mapping_file: str | Path) -> dict[str, Any]:
    data = json.loads(Path(mapping_file).read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{mapping_file}: expected a JSON object {{class: wnid_or_synset}}")
    return {str(k): v for k, v in data.items()}


def synsets_for_classes(
    wnids: Sequence[str | None],
    mapping_file: str | Path | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Synset | None]:
    """One Synset (or None) per class; index = class id.

    ``mapping_file`` is a JSON object whose keys are class indices or class names and whose
    values are wnids or synset names (a list value, as in ImageNet's class index file, uses
    its first element; null means no synset). It overrides ``wnids``. Entries that do not
    resolve become None with a warning, so one odd class does not stop an analysis.
    """
    mapping = _mapping(mapping_file) if mapping_file is not None else {}
    out: list[Synset | None] = []
    for i, entry in enumerate(wnids):
        ref: Any = entry
        keys = [str(i)]
        if class_names is not None and i < len(class_names):
            keys.append(str(class_names[i]))
        if entry is not None:
            keys.append(str(entry))
        for key in keys:
            if key in mapping:
                ref = mapping[key]
                break
        if isinstance(ref, list):
            ref = ref[0] if ref else None
        if ref is None:
            warnings.warn(f"class {i}: no WordNet synset given", stacklevel=2)
            out.append(None)
            continue
        try:
            out.append(to_synset(str(ref)))
        except (ValueError, WordNetError) as exc:
            warnings.warn(f"class {i}: {ref!r} is not in WordNet 3.0 ({exc})", stacklevel=2)
            out.append(None)
    return out


# --------------------------------------------------------------------------- relations


def pair_similarity(wnid_a: str | Synset, wnid_b: str | Synset) -> dict[str, Any]:
    """WordNet similarities of two classes, as plain JSON-able values.

    Keys: ``a``, ``b`` (synset names), ``wup`` (Wu-Palmer), ``path``, ``lch``
    (Leacock-Chodorow; None across parts of speech) and ``lowest_common_hypernyms``.
    """
    a = wnid_a if isinstance(wnid_a, Synset) else _cached_synset(wnid_a)
    b = wnid_b if isinstance(wnid_b, Synset) else _cached_synset(wnid_b)

    def num(x: Any) -> float | None:
        return None if x is None else float(x)

    if a.pos() == b.pos() == "n":
        # From the ancestor distances kept per synset (see ``wup_similarity``): the detection
        # table of a 1,000-class model names tens of thousands of class pairs.
        da, db = _distances(a), _distances(b)
        distance = _path_distance(da, db)
        common = [t for t in da if t in db]
        deepest = max((_max_depth(t) for t in common), default=None)
        return {
            "a": a.name(),
            "b": b.name(),
            "wup": _noun_wup(a, b),
            "path": None if math.isinf(distance) else 1.0 / (distance + 1),
            "lch": None if math.isinf(distance) else -math.log((distance + 1) / (2.0 * _NOUN_MAX_DEPTH)),
            "lowest_common_hypernyms": sorted(t.name() for t in common if _max_depth(t) == deepest),
        }
    return {
        "a": a.name(),
        "b": b.name(),
        "wup": num(a.wup_similarity(b)),
        "path": num(a.path_similarity(b)),
        "lch": _lch(a, b),
        "lowest_common_hypernyms": sorted(s.name() for s in a.lowest_common_hypernyms(b)),
    }


def wup_similarity(wnid_a: str, wnid_b: str) -> float | None:
    """Wu-Palmer similarity of two classes alone (what Figure 3 plots for every candidate pair;
    ``pair_similarity`` also walks paths and hypernyms, several times the cost).

    Nouns take ``_noun_wup``, nltk's ``Synset.wup_similarity`` over ancestor distances kept per
    synset: a 1,000-class model has hundreds of thousands of class pairs, and nltk walks both
    hypernym graphs and re-reads the corpus version from its data file on every call (about
    1 ms a pair). Other parts of speech (a simulated root) go to nltk."""
    a, b = _cached_synset(wnid_a), _cached_synset(wnid_b)
    if a.pos() == b.pos() == "n":
        return _noun_wup(a, b)
    value = a.wup_similarity(b)
    return None if value is None else float(value)


# Per synset, kept for the process (WordNet 3.0 does not change under a running process; the
# keys are synsets of the verified reader): resolving a wnid re-checks the provisioned corpus,
# and nltk recomputes min_depth along every hypernym path on each call.
_synsets: dict[str, Synset] = {}
_ancestor_distances: dict[Synset, dict[Synset, int]] = {}
_min_depths: dict[Synset, int] = {}


def _cached_synset(wnid: str) -> Synset:
    if wnid not in _synsets:
        _synsets[wnid] = to_synset(wnid)
    return _synsets[wnid]


def _min_depth(s: Synset) -> int:
    if s not in _min_depths:
        _min_depths[s] = s.min_depth()
    return _min_depths[s]


_max_depths: dict[Synset, int] = {}


def _max_depth(s: Synset) -> int:
    if s not in _max_depths:
        _max_depths[s] = s.max_depth()
    return _max_depths[s]


def _distances(s: Synset) -> dict[Synset, int]:
    """Every hypernym of ``s`` (itself included) -> its shortest hypernym-path distance, the
    breadth-first walk of nltk's ``_shortest_hypernym_paths`` without a simulated root."""
    if s not in _ancestor_distances:
        out: dict[Synset, int] = {}
        frontier, depth = [s], 0
        while frontier:
            nxt = []
            for t in frontier:
                if t not in out:
                    out[t] = depth
                    nxt += _parents(t)
            frontier, depth = nxt, depth + 1
        _ancestor_distances[s] = out
    return _ancestor_distances[s]


def _path_distance(da: dict[Synset, int], db: dict[Synset, int]) -> float:
    return min((d + db[t] for t, d in da.items() if t in db), default=math.inf)


def _noun_wup(a: Synset, b: Synset) -> float | None:
    """nltk 3.9's ``Synset.wup_similarity(other)`` for two nouns of WordNet 3.0 (no simulated
    root): the lowest common hypernym by minimum depth (``use_min_depth=True``), ties by name
    with ``a`` itself preferred, its maximum depth + 1 against the paths to it."""
    da, db = _distances(a), _distances(b)
    common = [t for t in da if t in db]
    if not common:
        return None
    deepest = max(_min_depth(t) for t in common)
    lowest = sorted(t for t in common if _min_depth(t) == deepest)
    subsumer = a if a in lowest else lowest[0]
    depth = _max_depth(subsumer) + 1
    ds = _distances(subsumer)
    len1, len2 = _path_distance(da, ds), _path_distance(db, ds)
    if math.isinf(len1) or math.isinf(len2):
        return None
    return (2.0 * depth) / (len1 + depth + len2 + depth)


def _lch(a: Synset, b: Synset) -> float | None:
    if a.pos() != b.pos():
        return None
    if a.pos() != "n":
        return None if (v := a.lch_similarity(b)) is None else float(v)
    # nltk's lch first walks all 82,115 nouns (about 10 s) to find this known 3.0 constant.
    distance = a.shortest_path_distance(b, simulate_root=False)
    if distance is None or distance < 0:
        return None
    return -math.log((distance + 1) / (2.0 * _NOUN_MAX_DEPTH))


def _parents(s: Synset) -> list[Synset]:
    # Instance synsets (named individuals) only have instance hypernyms.
    return s.hypernyms() + s.instance_hypernyms()


def hypernym_closure(wnid: str | Synset) -> list[str]:
    """All hypernym synset names of a class up to the root, nearest first, without itself."""
    start = to_synset(wnid)
    seen = {start.name()}
    out: list[str] = []
    frontier = [start]
    while frontier:
        nxt = []
        for s in frontier:
            for p in sorted(_parents(s), key=lambda x: x.name()):
                if p.name() not in seen:
                    seen.add(p.name())
                    out.append(p.name())
                    nxt.append(p)
        frontier = nxt
    return out


def concept_sets(wnids: Sequence[str | Synset | None]) -> dict[str, frozenset[int]]:
    """Every concept (each class's own synset and all its hypernyms) -> class indices under it.

    Index = class id; None entries (unmapped classes) belong to no concept. Keys are sorted.
    """
    members: dict[str, set[int]] = {}
    for i, ref in enumerate(wnids):
        if ref is None:
            continue
        s = to_synset(ref)
        for name in (s.name(), *hypernym_closure(s)):
            members.setdefault(name, set()).add(i)
    return {k: frozenset(members[k]) for k in sorted(members)}
