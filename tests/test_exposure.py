"""A path given as weights never makes the program repeat what the file holds.

A symlink to a private text file (here one shaped like /etc/shadow, with a marker no other file
holds) is given as ``--weights``, loaded through the library, and dropped into a watched folder:
the refusal names the path and what it is, and no byte sequence of the marker reaches stdout,
stderr, the logs, the watcher's registry or the Prefect database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, cifar_subset

MARKER = "SECRETMARKER7f3c9e"
SECRET = f"root:$6${MARKER}$Qx1vJ0aLrT9/8zVb2Yw.:19800:0:99999:7:::\ndaemon:*:19800:0:99999:7:::\n"
# Pieces of the marker that a partial quote (a cut-off excerpt, a repr) would still contain.
FRAGMENTS = (MARKER, MARKER[:8], MARKER[-8:], "Qx1vJ0aLrT9", "root:$6$")
RESNET20 = ("weights", "cifar10-resnet", "resnet20-12fca82f.th")


def _assert_no_secret(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for fragment in FRAGMENTS:
        assert fragment.encode() not in data, f"{where} holds {fragment!r} of the secret file"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "private" / "shadow"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polysemantic_disentangle.flows.cli", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT,
                          env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})


def test_weights_symlink_to_a_private_file_is_refused_by_what_it_is(tmp_path: Path, secret: Path) -> None:
    """`disentangle run --weights` with a symlink to a text file, a FIFO, a device or a folder:
    exit status 2, one line naming the path and what was expected and found, nothing of the
    file, and no wait on the FIFO (it is never opened)."""
    links = {"text.pt": secret, "zero.pt": Path("/dev/zero"), "folder.pt": secret.parent}
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    os.mkfifo(tmp_path / "pipe.pt")
    found = {"text.pt": "found a symlink to a text file", "zero.pt": "found a symlink to a character device",
             "folder.pt": "found a symlink to a directory", "pipe.pt": "found a named pipe (FIFO)"}
    for name, needle in found.items():
        weights = tmp_path / name
        done = _cli("run", "--weights", str(weights), "--out-dir", str(tmp_path / "run"), "--device", "cpu",
                    timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done
        assert len(lines) == 1 and lines[0].startswith("disentangle: error: "), done.stderr
        assert str(weights) in lines[0] and "expected a state dict for cifar_resnet20" in lines[0], lines[0]
        assert needle in lines[0], lines[0]
        _assert_no_secret(done.stdout + done.stderr, f"the output of --weights {name}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["text", "zip-signature", "pickle-signature", "pickle-global"])
def test_loading_never_quotes_the_file(tmp_path: Path, secret: Path, kind: str) -> None:
    """Through the library too: the registry, the checkpoint loader and the rewired-checkpoint
    loader refuse the file; files that start like a checkpoint and then hold the secret reach
    torch, whose error text is never passed on."""
    from polysemantic_disentangle.tasks.models.registry import load_model, read_state_dict
    from polysemantic_disentangle.tasks.models.safe_load import CheckpointError
    from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled

    path = tmp_path / "weights.pt"
    if kind == "text":
        path.symlink_to(secret)
    else:
        head = {"zip-signature": b"PK\x03\x04", "pickle-signature": b"\x80\x02", "pickle-global": b"\x80\x02c"}[kind]
        path.write_bytes(head + SECRET.encode())
    for load in (lambda: load_model("cifar_resnet20", path), lambda: read_state_dict(path),
                 lambda: load_disentangled(path)):
        with pytest.raises(CheckpointError) as err:
            load()
        message = str(err.value)
        assert str(path) in message and "expected" in message and "found" in message, message
        assert "\n" not in message
        _assert_no_secret(message, f"the error for a {kind} file")


def _prefect_database() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    assert url and url.startswith("sqlite"), url
    return Path(url.split(":///", 1)[1])


def _bytes_of_database(db: Path) -> bytes:
    """Every byte of a SQLite database, its journal and write-ahead log included."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")) if p.is_file())


def _flush_logs() -> None:
    """Send the logs still queued for the API (they go in batches, from a worker thread)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)


@pytest.fixture
def watched(tmp_path: Path, secret: Path):
    """A watched folder holding a symlink to the private file, a symlink to a FIFO (never listed:
    not a regular file) and a file that starts like a pickle and then holds the secret."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "leak.pt").symlink_to(secret)
    os.mkfifo(tmp_path / "pipe")
    (folder / "pipe.pt").symlink_to(tmp_path / "pipe")
    (folder / "forged.pt").write_bytes(b"\x80\x02" + SECRET.encode())
    for f in (folder / "leak.pt", folder / "forged.pt"):  # old: not "still being written"
        os.utime(f, (1e9, 1e9))
    return folder


def test_watcher_refuses_a_private_file_once_and_keeps_it_out_of_every_record(
        watched: Path, tmp_path: Path, prefect_api, capfd, caplog, monkeypatch) -> None:
    from polysemantic_disentangle.flows.watch import flow as watch_flow
    from polysemantic_disentangle.flows.watch import scan, steps
    from polysemantic_disentangle.flows.watch.registry import Registry

    reads: list[str] = []
    loads: list[str] = []
    real_check, real_load = scan.not_a_checkpoint_file, steps.load_problem
    monkeypatch.setattr(scan, "not_a_checkpoint_file", lambda fs, p, local: reads.append(p) or real_check(fs, p, local))
    monkeypatch.setattr(steps, "load_problem", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    registry = tmp_path / "watch" / "registry.sqlite"
    scan_args = dict(location=str(watched), patterns=["*.pt"], registry=str(registry), trends="none")

    first = watch_flow.watch_checkpoints(**scan_args)
    second = watch_flow.watch_checkpoints(**scan_args)
    _flush_logs()

    # refused, with a reason that names the file and what it is
    for summary in (first, second):
        assert summary["refused"] == 2 and summary["started"] == 0 and summary["failed"] == 0, summary
        reasons = {Path(r["checkpoint"]).name: r["error"] for r in summary["files"]}
        assert set(reasons) == {"leak.pt", "forged.pt"}  # the FIFO is not listed, so never opened
        assert "leak.pt: expected a torch checkpoint" in reasons["leak.pt"]
        assert "found a symlink to a text file" in reasons["leak.pt"]
        assert "found a pickle" in reasons["forged.pt"]
    # read once: the second scan trusts the unchanged size and stamp, and the refused content
    assert [Path(p).name for p in reads] == ["forged.pt", "leak.pt"]
    assert len(loads) == 1
    rows = Registry(registry).refusals()
    assert {Path(r["url"]).name for r in rows} == {"leak.pt", "forged.pt"}
    assert not Registry(registry).analyses()  # no analysis, so no flow run of the pipeline

    # nothing of the file anywhere
    out, err = capfd.readouterr()
    _assert_no_secret(out + err, "stdout/stderr")
    _assert_no_secret(caplog.text, "the log records")
    _assert_no_secret(json.dumps([first, second], default=str), "the scan summaries")
    _assert_no_secret(_bytes_of_database(registry), "the watcher's registry")
    database = _bytes_of_database(_prefect_database())
    assert b"leak.pt: expected a torch checkpoint" in database, "the refusal never reached the Prefect database"
    _assert_no_secret(database, "the Prefect database")


def test_watcher_checks_a_refused_file_again_once_it_changes(tmp_path: Path, assets_dir: Path, prefect_api,
                                                             monkeypatch) -> None:
    """A refused file is not read again while its size and stamp stay; rewritten, it is
    checked again (and, now a checkpoint, no longer refused)."""
    from polysemantic_disentangle.flows.watch import flow as watch_flow
    from polysemantic_disentangle.flows.watch import scan, steps
    from polysemantic_disentangle.flows.watch.registry import Registry

    folder = tmp_path / "ckpts"
    folder.mkdir()
    notes = folder / "notes.pt"
    notes.write_text("epoch 3: loss 0.12\n")
    os.utime(notes, (1e9, 1e9))
    reads: list[str] = []
    real_check = scan.not_a_checkpoint_file
    monkeypatch.setattr(scan, "not_a_checkpoint_file", lambda fs, p, local: reads.append(p) or real_check(fs, p, local))
    # The analysis itself is not what this test is about: it is replaced by its recorded outcome.
    monkeypatch.setattr(steps, "analyse_in_process", lambda params, name: ("completed", None, {}, None))
    registry = tmp_path / "registry.sqlite"
    scan_args = dict(location=str(folder), patterns=["*.pt"], registry=str(registry), trends="none")

    for _ in range(3):
        summary = watch_flow.watch_checkpoints(**scan_args)
        assert summary["refused"] == 1 and summary["started"] == 0
    assert len(reads) == 1

    shutil.copyfile(assets_dir.joinpath(*RESNET20), notes)
    os.utime(notes, (2e9 - 1, 1e9 + 5))  # another stamp, and not "still being written"
    summary = watch_flow.watch_checkpoints(**scan_args)
    assert len(reads) == 2
    assert summary["refused"] == 0 and summary["started"] == 1 and summary["completed"] == 1, summary
    assert not [r for r in Registry(registry).refusals() if r["sha256"] is None]


def test_same_data_by_relative_absolute_and_symlinked_path_is_one_store(tmp_path: Path, assets_dir: Path,
                                                                         monkeypatch) -> None:
    """The stores' identity is the data's (resolved root, images and labels) and the weights'
    content, not how their paths are spelt: the second and third spelling reopen the stores
    (resume); other images are still refused as other inputs."""
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.flows.preflight import prepare_stores
    from polysemantic_disentangle.storage.cube import CubeMismatch, open_store_group

    work = tmp_path / "work"
    cifar_subset(assets_dir, work / "data" / "train", "train", 3)
    cifar_subset(assets_dir, work / "data" / "test", "test", 2)
    (work / "alias").symlink_to(work / "data")
    shutil.copyfile(assets_dir.joinpath(*RESNET20), work / "resnet20.th")
    monkeypatch.chdir(work)
    common = dict(out_dir=str(tmp_path / "run"), layers=["layer3.2.conv2"], chunk_images=16)
    spellings = [
        dict(train_dir="data/train", eval_dir="data/test", weights="resnet20.th"),
        dict(train_dir=str(work / "data" / "train"), eval_dir=str(work / "data" / "test"),
             weights=str(work / "resnet20.th")),
        dict(train_dir="alias/train", eval_dir="./alias/../alias/test", weights="./resnet20.th"),
    ]
    fingerprints = []
    for spelling in spellings:
        params = PipelineParams(**common, **spelling).resolved()
        prepare_stores(params)  # raises CubeMismatch on "other inputs"
        fingerprints.append([open_store_group(s).attrs["fingerprint"] for s in (params.train_store, params.eval_store)])
    assert fingerprints[0] == fingerprints[1] == fingerprints[2]

    cifar_subset(assets_dir, work / "other" / "train", "train", 3, offset=3)
    with pytest.raises(CubeMismatch, match="other inputs"):
        prepare_stores(PipelineParams(**common, **{**spellings[0], "train_dir": "other/train"}).resolved())


def test_the_follower_hands_non_checkpoints_to_the_scan_and_never_opens_a_fifo(tmp_path: Path, secret: Path) -> None:
    """Opening a FIFO for reading waits for a writer: a symlink to one in a followed folder must
    not block the follower (it is passed to the scan, which refuses it without opening it)."""
    import threading

    from polysemantic_disentangle.flows.watch.trend import loadable, ready_for_scan, still_written

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "pipe.pt").symlink_to(tmp_path / "pipe")
    (tmp_path / "text.pt").symlink_to(secret)
    (tmp_path / "empty.pt").write_bytes(b"")
    answers: dict[str, tuple[bool, bool, bool]] = {}

    def look() -> None:
        for name in ("pipe.pt", "text.pt", "empty.pt"):
            path = tmp_path / name
            answers[name] = (ready_for_scan(path), loadable(path), still_written(path))

    looker = threading.Thread(target=look, daemon=True)
    looker.start()
    looker.join(timeout=60)
    if looker.is_alive():  # release the reader that opened the FIFO, then fail
        os.close(os.open(tmp_path / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the follower opened a FIFO and waited for a writer")
    assert answers["pipe.pt"] == (True, False, False)
    assert answers["text.pt"] == (True, False, False)
    assert answers["empty.pt"] == (False, False, True)  # being created: waited for
