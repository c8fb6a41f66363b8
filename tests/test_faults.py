"""Faults at every stage: kill anywhere and rerun, one run per folder, no orphaned servers,
checkpoint errors in the product's words, full and read-only disks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import PROJECT_ROOT, cifar_subset

RESNET20 = ("weights", "cifar10-resnet", "resnet20-12fca82f.th")
RESNET56 = ("weights", "cifar10-resnet", "resnet56-4bfd9763.th")

# A tiny but complete run: 200 detection and 100 evaluation images in chunks of 10 (so that an
# extraction has many chunks to be killed between), two layers, a short feature visualisation.
TINY_ARGS = ["--max-per-class-train", "20", "--max-per-class-eval", "10", "--check-images", "20",
             "--rho-max-images", "8", "--chunk-images", "10", "--batch-size", "10",
             "--shard-chunks", "5", "--layers", "layer3.2.conv1,layer3.2.conv2", "--p", "0.5",
             "--max-rewired-per-layer", "1", "--featvis-channels", "1", "--featvis-steps", "4"]


# --------------------------------------------------------------------------------------------
# checkpoint errors


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _assert_product_words(message: str, path: Path, expected: str, found: str) -> None:
    assert str(path) in message, message
    assert f"expected {expected}" in message, message
    assert re.search(found, message), message
    assert "weights_only" not in message and "weights only" not in message.lower(), message


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "truncated-zip", "pickle", "zip-pickle", "legacy-pickle"])
def test_bad_state_dict_files_get_clear_errors(tmp_path, assets_dir, kind) -> None:
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.models.safe_load import CheckpointError

    path = tmp_path / f"{kind}.th"
    marker = tmp_path / "MARKER"
    found = {"empty": r"found an empty file \(0 bytes\)",
             "text": r"found a text file \(\d+ bytes\)$",
             "truncated": r"found a pickle \(\d+ bytes\) that ends early: truncated or corrupted",
             "truncated-zip": r"found a damaged or truncated zip archive .*ends early",
             "pickle": r"found a pickle .* would import and call posix.system.*refused",
             "zip-pickle": r"found a zip archive .* would import and call posix.system.*refused",
             "legacy-pickle": r"would import and call posix.system.*refused"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("epoch 3 loss 0.12\nthese are notes, not weights\n")
    elif kind == "truncated":
        data = assets_dir.joinpath(*RESNET20).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-zip":
        torch.save(load_model("cifar_resnet20").model.state_dict(), tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}, protocol=2))
    elif kind == "zip-pickle":
        torch.save({"state_dict": _WritesMarker(marker)}, path)
    else:
        torch.save({"state_dict": _WritesMarker(marker)}, path, _use_new_zipfile_serialization=False)
    # the payload is real: an unrestricted load writes the marker
    probe = tmp_path / "probe.th"
    shutil.copyfile(path, probe)
    with pytest.raises(CheckpointError) as err:
        load_model("cifar_resnet20", path)
    _assert_product_words(str(err.value), path, "a state dict for cifar_resnet20", found)
    assert "epoch" not in str(err.value) and "notes" not in str(err.value), "the file's text was quoted"
    assert not marker.exists(), "a checkpoint ran code while being loaded"
    if kind in ("pickle", "zip-pickle", "legacy-pickle"):
        with contextlib.suppress(Exception):  # a plain pickle runs its payload, then fails
            torch.load(probe, weights_only=False)  # what must never happen in the product
        assert marker.exists(), "the malicious test file is inert; the test proves nothing"


def test_wrong_architecture_is_named(tmp_path, assets_dir) -> None:
    from polysemantic_disentangle.tasks.models.registry import load_model

    with pytest.raises(ValueError, match=r"resnet56-4bfd9763.th does not match CifarResNet: \d+ unexpected keys"):
        load_model("cifar_resnet20", assets_dir.joinpath(*RESNET56))


def test_rewired_checkpoint_errors_name_the_model_and_spec(tmp_path, assets_dir) -> None:
    from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import BaseModelMismatch, load_disentangled, save_disentangled
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.models.safe_load import CheckpointError

    r20 = load_model("cifar_resnet20", assets_dir.joinpath(*RESNET20))
    r56 = load_model("cifar_resnet56", assets_dir.joinpath(*RESNET56))
    good = tmp_path / "good.pt"
    save_disentangled(good, r20, r20.model, [])
    model, spec = load_disentangled(good)
    assert spec["base"]["name"] == "cifar_resnet20"
    expected = "a rewired checkpoint (disentangled-checkpoint/1: a spec and the rewired state dict)"

    # the base weights of another model
    with pytest.raises(BaseModelMismatch, match=r"resnet56-4bfd9763.th have sha256 .*\(cifar_resnet20\)"):
        load_disentangled(good, base_weights=assets_dir.joinpath(*RESNET56))
    # a spec that names one model and tensors of another (a forged or mixed-up file)
    forged = tmp_path / "forged.pt"
    save_disentangled(forged, r20, r56.model, [])
    with pytest.raises(CheckpointError) as err:
        load_disentangled(forged)
    assert re.search(r"expected the state dict of cifar_resnet20 rewired as its spec says \(0 split "
                     r"channels\), found tensors that do not fit it", str(err.value)), err.value
    # a model's plain weights given where a rewired checkpoint belongs
    with pytest.raises(CheckpointError) as err:
        load_disentangled(assets_dir.joinpath(*RESNET20))
    _assert_product_words(str(err.value), assets_dir.joinpath(*RESNET20), expected,
                          r"found a plain state dict of \d+ tensors")
    # a malicious file posing as a rewired checkpoint
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "disentangled-checkpoint/1", "spec": _WritesMarker(marker), "state_dict": {}}, evil)
    with pytest.raises(CheckpointError) as err:
        load_disentangled(evil)
    _assert_product_words(str(err.value), evil, expected, r"would import and call posix.system")
    assert not marker.exists()
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_disentangled(empty)
    _assert_product_words(str(err.value), empty, expected, r"found an empty file")


def test_cli_reports_a_bad_weights_file_in_one_line(tmp_path, capsys, prefect_api) -> None:
    from polysemantic_disentangle.flows.cli import main

    bad = tmp_path / "notes.th"
    bad.write_text("not weights")
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    assert main(["extract", "--data-dir", str(tmp_path / "data"), "--store", str(tmp_path / "s.zarr"),
                 "--weights", str(bad)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"disentangle: error: {bad}: expected a state dict for cifar_resnet20"), last
    assert last.endswith("found a text file (11 bytes)"), last
    assert "not weights" not in err, "the file's contents were quoted"
    assert "weights_only=False" not in err and "`weights_only` set to `False`" not in err


# --------------------------------------------------------------------------------------------
# locks


_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from polysemantic_disentangle.flows.runtime.locking import holding, run_locks
with holding(run_locks({out!r}, [])):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=str(PROJECT_ROOT), out=str(out))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_folder_fails_at_once_or_waits(tmp_path, assets_dir, capsys) -> None:
    from polysemantic_disentangle.flows.cli import main
    from polysemantic_disentangle.flows.runtime.locking import LockBusy, holding, run_dir_lock_path, run_locks

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=1)
    out = tmp_path / "run"
    args = ["run", "--train-dir", str(data), "--eval-dir", str(data), "--out-dir", str(out)]
    holder = _start_holder(out)
    try:
        t = time.monotonic()
        assert main(args) == 3
        err = capsys.readouterr().err
        assert f"output folder {out} is in use by pid {holder.pid} on {socket.gethostname()}" in err, err
        assert "--wait-for-lock" in err
        assert main([*args, "--wait-for-lock", "1.5"]) == 3
        err = capsys.readouterr().err
        assert f"waiting for output folder {out}: in use by pid {holder.pid}" in err, err
        assert "gave up after waiting 1.5 s" in err
        assert time.monotonic() - t >= 1.5
        assert not (out / "cube-train.zarr").exists(), "a refused run must not start work"
        # the store of a run is locked on its own too: another run writing into it is refused
        with pytest.raises(LockBusy, match="in use by pid"):
            with holding(run_locks(None, [str(tmp_path / "x.zarr")]), wait=0):
                with subprocess.Popen([sys.executable, "-c", (
                        f"import sys; sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
                        "from polysemantic_disentangle.flows.runtime.locking import holding, run_locks\n"
                        f"with holding(run_locks(None, [{str(tmp_path / 'x.zarr')!r}]), wait=0): pass\n")],
                        stderr=subprocess.PIPE, text=True) as other:
                    _, other_err = other.communicate(timeout=60)
                    raise LockBusy(other_err)
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed holder: its record is still in the file, the kernel lock is gone: taken over
    lock = run_dir_lock_path(out)
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with holding(run_locks(str(out), []), wait=0):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with holding(run_locks(str(out), []), wait=0):  # re-entrant within one process
            pass
    assert not lock.exists(), "the lock file is removed on release"


def test_waiting_run_proceeds_when_the_holder_ends(tmp_path) -> None:
    from polysemantic_disentangle.flows.runtime.locking import holding, run_locks

    out = tmp_path / "run"
    holder = _start_holder(out)
    messages: list[str] = []
    threading.Timer(1.0, holder.kill).start()
    with holding(run_locks(str(out), []), wait=120, on_wait=messages.append):
        # The kernel lets the lock go while the killed holder exits, a moment before the
        # process can be reaped: poll() may still say "running" then, so wait (briefly) for it.
        assert holder.wait(timeout=30) is not None
    assert len(messages) == 1 and f"in use by pid {holder.pid}" in messages[0]


# --------------------------------------------------------------------------------------------
# read-only and full file systems (real tmpfs mounts; CI runs as root)


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_output_folder_fails_before_any_model_pass(tmp_path, assets_dir, capsys) -> None:
    from polysemantic_disentangle.flows.cli import main

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=1)
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "size=1m,ro")
    try:
        for out in (ro, ro / "new-run"):
            t = time.monotonic()
            assert main(["run", "--train-dir", str(data), "--eval-dir", str(data), "--out-dir", str(out)]) == 3
            err = capsys.readouterr().err
            assert "not writable" in err or "cannot be created" in err, err
            assert "Read-only file system" in err and str(out) in err, err
            assert time.monotonic() - t < 60  # refused up front, not after model passes
    finally:
        _umount(ro)


def _store_arrays(url: str) -> dict[str, np.ndarray]:
    """Every array of the store except its provenance (which process wrote each chunk)."""
    from polysemantic_disentangle.storage.cube import PROVENANCE_GROUPS, open_store_group

    out: dict[str, np.ndarray] = {}

    def walk(group, prefix: str) -> None:
        for name, arr in group.arrays():
            out[prefix + name] = arr[:]
        for name, sub in group.groups():
            if not (prefix == "" and name in PROVENANCE_GROUPS):
                walk(sub, f"{prefix}{name}/")

    walk(open_store_group(url), "")
    return out


def _assert_same_arrays(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str) -> None:
    assert set(ref) == set(got), f"{what}: arrays differ: {sorted(set(ref) ^ set(got))}"
    for name in ref:
        a, b = np.asarray(ref[name]), np.asarray(got[name])
        assert a.shape == b.shape, f"{what}/{name}"
        if a.dtype.kind in "fc":
            np.testing.assert_array_equal(a, b, err_msg=f"{what}/{name}")  # NaN == NaN here
        else:
            assert a.tolist() == b.tolist(), f"{what}/{name}"


@pytest.mark.slow
def test_full_disk_fails_clearly_and_resumes_identically(tmp_path, assets_dir, prefect_api) -> None:
    from polysemantic_disentangle.flows.extract import extract_relevance_cube
    from polysemantic_disentangle.storage.cube import completed_chunks

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=16)
    common = dict(data_dir=str(data), layers="all", chunk_images=16, shard_chunks=2, batch_size=16)
    reference = tmp_path / "reference.zarr"
    extract_relevance_cube(store_url=str(reference), **common)
    # Allocated bytes, not file sizes: the cube is many small files, and tmpfs gives each whole pages.
    size = sum(f.stat().st_blocks * 512 for f in reference.rglob("*") if f.is_file())
    small = tmp_path / "small"
    _mount_tmpfs(small, f"size={size * 6 // 10}")
    try:
        store = small / "cube.zarr"
        with pytest.raises(OSError) as err:
            extract_relevance_cube(store_url=str(store), **common)
        assert err.value.errno == errno.ENOSPC, err.value
        assert "No space left on device" in str(err.value)
        done = completed_chunks(str(store))
        assert 0 < done.sum() < len(done), "the disk filled up too early or too late to test resuming"
        subprocess.run(["mount", "-o", f"remount,size={size * 3}", str(small)], check=True)  # space freed
        extract_relevance_cube(store_url=str(store), **common)
        assert completed_chunks(str(store)).all()
        _assert_same_arrays(_store_arrays(str(reference)), _store_arrays(str(store)), "cube")
    finally:
        _umount(small)


# --------------------------------------------------------------------------------------------
# kill anywhere, rerun, same result; no process of a killed run survives


def _pgid_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _port_free(port: int) -> bool:
    """Nothing listens on the port (SO_REUSEADDR, as servers bind: connections of the killed
    server left in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@dataclass
class RunResult:
    rc: int
    log: str
    descendants: dict[int, str] = field(default_factory=dict)  # pid -> command line
    ports: set[int] = field(default_factory=set)
    survivors: list[str] = field(default_factory=list)


def _run_cli(args: list[str], env: dict[str, str], kill_on: str | None = None,
             before_kill: Callable[[int], None] | None = None, timeout: float = 1800) -> RunResult:
    """Run ``disentangle`` as a user does; SIGKILL its pid (only it) when a log line matches
    ``kill_on`` (after ``before_kill(pid)``). Afterwards, every process it ever started must be
    gone and their ports free."""
    proc = subprocess.Popen([sys.executable, "-m", "polysemantic_disentangle.flows.cli", *args], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    result = RunResult(rc=0, log="")
    lines: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every descendant ever seen, with the ports named on its command line
        while not stop.is_set():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        cmd = child.cmdline()
                    except psutil.Error:
                        continue
                    result.descendants[child.pid] = " ".join(cmd)
                    if "--port" in cmd:
                        result.ports.add(int(cmd[cmd.index("--port") + 1]))
            except psutil.Error:
                pass
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_on and re.search(kill_on, line):
                if before_kill is not None:
                    before_kill(proc.pid)
                stop.set()
                watcher.join()
                os.kill(proc.pid, signal.SIGKILL)
                kill_on = None
            if time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                pytest.fail("disentangle run did not finish in time:\n" + "".join(lines[-80:]))
        result.rc = proc.wait(timeout=60)
        stop.set()
        watcher.join()
        result.log = "".join(lines)
        gone_by = time.monotonic() + 30
        while time.monotonic() < gone_by:
            alive = [pid for pid in result.descendants if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
            alive += [pid for pid in _pgid_members(proc.pid) if pid not in alive]
            if not alive and all(_port_free(p) for p in result.ports):
                break
            time.sleep(0.2)
        result.survivors = [f"{pid}: {result.descendants.get(pid, '?')}" for pid in alive]
        result.survivors += [f"port {p} still bound" for p in result.ports if not _port_free(p)]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave anything behind, even on failure
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait()
    return result


def _normalised(obj, *out_dirs: str):
    if isinstance(obj, dict):
        # when it was made and how long it took are not results, nor the preflight's record
        # (its time estimate is measured on this machine at each start)
        return {k: _normalised(v, *out_dirs) for k, v in obj.items()
                if k not in ("created", "timings_s", "preflight")}
    if isinstance(obj, list):
        return [_normalised(v, *out_dirs) for v in obj]
    if isinstance(obj, str):
        for out_dir in out_dirs:
            obj = obj.replace(out_dir, "<out>")
        return obj
    return obj


def _assert_same_results(ref: Path, got: Path) -> None:
    for store in ("cube-train.zarr", "cube-eval.zarr"):
        _assert_same_arrays(_store_arrays(str(ref / store)), _store_arrays(str(got / store)), store)
    assert_same_run_files(ref, got)
    assert (got / "report.html").stat().st_size > 0


def assert_same_run_files(ref: Path, got: Path, csv_files: tuple[str, ...] = ("detection.csv",),
                          json_files: tuple[str, ...] = ("detection.json", "summary.json", "disentangled.pt.json"),
                          ) -> None:
    """The run folders' tables, JSON results (paths and timings aside) and rewired tensors agree."""
    for name in csv_files:
        assert (ref / name).read_bytes() == (got / name).read_bytes(), name
    for name in json_files:
        a = _normalised(json.loads((ref / name).read_text()), str(ref))
        # A folder copied from the reference (the kill tests after a stage) keeps the stage
        # records of the reference, whose paths are absolute: they name the reference folder.
        b = _normalised(json.loads((got / name).read_text()), str(got), str(ref))
        assert a == b, name
    a = torch.load(ref / "disentangled.pt", weights_only=True)
    b = torch.load(got / "disentangled.pt", weights_only=True)
    assert a["spec"] == b["spec"] and set(a["state_dict"]) == set(b["state_dict"])
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key


# Each kill point is its own test over one shared reference run. A point after a stage starts
# from a copy of the reference folder without the records of that stage and the later ones
# (what a run killed right after the previous stage leaves), so that it runs only the stages
# from there on: independent, attributable to its point, and a fraction of a whole run.
STAGE_OF_POINT = {"reduced": "reduce", "detected": "detect", "rewired": "rewire", "evaluated": "evaluate",
                  "reported": "report"}
STAGE_ORDER = ("reduce", "detect", "rewire", "evaluate", "report")
EXTRACTION_POINTS = ("store-created", "train-extracted", "eval-extracted")
# Each kill test makes at most three tiny runs: a guard against hangs, sized for a 2-core
# machine under heavy load, not a pace a correct run must keep.
KILL_TEST_TIMEOUT = 2400


@dataclass
class KillSetup:
    command: Callable[[Path], list[str]]
    shared: dict[str, str]  # the test API's URL: every run reports to one server
    ephemeral: dict[str, str]  # no API: each run starts its own temporary server
    reference: Path


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, assets_dir, prefect_api) -> KillSetup:
    from prefect.settings import PREFECT_API_URL

    from polysemantic_disentangle.flows.runtime.faults import STOP_ENV

    root = tmp_path_factory.mktemp("kill")
    train = cifar_subset(assets_dir.resolve(), root / "data" / "train", "train", 20)
    test = cifar_subset(assets_dir.resolve(), root / "data" / "test", "test", 10)
    env = {k: v for k, v in os.environ.items() if k not in (STOP_ENV, "PREFECT_API_URL")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")

    def command(out: Path) -> list[str]:
        return ["run", "--train-dir", str(train), "--eval-dir", str(test), *TINY_ARGS, "--out-dir", str(out)]

    setup = KillSetup(command, {**env, "PREFECT_API_URL": PREFECT_API_URL.value()},
                      {**env, "PREFECT_HOME": str(root / "prefect-home")}, root / "reference")
    ref = _run_cli(command(setup.reference), setup.shared)
    assert ref.rc == 0, ref.log[-4000:]
    return setup


def _folder_before(setup: KillSetup, stage: str, out: Path) -> None:
    """The reference folder as a run killed just before ``stage`` recorded it leaves it."""
    shutil.copytree(setup.reference, out, ignore=shutil.ignore_patterns("*.lock"))
    for later in STAGE_ORDER[STAGE_ORDER.index(stage):]:
        (out / ".stages" / f"{later}.json").unlink(missing_ok=True)


def _killed_then_rerun(setup: KillSetup, out: Path, point: str, env: dict[str, str], *,
                       stop_env: bool = True, kill_on: str | None = None,
                       before_kill: Callable[[int], None] | None = None) -> RunResult:
    from polysemantic_disentangle.flows.runtime.faults import STOP_ENV

    run_env = {**env, STOP_ENV: point} if stop_env else env
    res = _run_cli(setup.command(out), run_env, kill_on=kill_on, before_kill=before_kill)
    assert res.rc == -signal.SIGKILL, f"{point}: rc {res.rc}\n{res.log[-4000:]}"
    if stop_env:
        assert f"stop point {point}: killing pid" in res.log, res.log[-3000:]
    assert not res.survivors, f"{point}: processes of the killed run survive: {res.survivors}"
    final = _run_cli(setup.command(out), setup.shared)
    assert final.rc == 0, f"rerun after {point}: rc {final.rc}\n{final.log[-4000:]}"
    assert not final.survivors
    _assert_same_results(setup.reference, out)
    return res


@pytest.mark.slow
@pytest.mark.timeout(KILL_TEST_TIMEOUT)
@pytest.mark.parametrize("point", EXTRACTION_POINTS)
def test_killed_during_extraction_and_rerun_gives_the_same_result(kill_setup, tmp_path, point) -> None:
    _killed_then_rerun(kill_setup, tmp_path / "run", point, kill_setup.shared)


@pytest.mark.slow
@pytest.mark.timeout(KILL_TEST_TIMEOUT)
def test_killed_from_outside_mid_extraction_leaves_no_server_and_resumes(kill_setup, tmp_path) -> None:
    """SIGKILL from outside while the train cube's shards write chunks, with the run's own
    temporary Prefect server: the server dies with it, and the rerun resumes the cube. Killed
    when the second of four shards reports its end (chunks are not logged one by one)."""
    res = _killed_then_rerun(kill_setup, tmp_path / "run", "external SIGKILL during train extraction",
                             kill_setup.ephemeral, stop_env=False, kill_on=r"extract-shard-1.*shard 1 on ")
    assert res.ports, "the temporary Prefect server was not seen"


@pytest.mark.slow
@pytest.mark.timeout(KILL_TEST_TIMEOUT)
@pytest.mark.parametrize("point", list(STAGE_OF_POINT))
def test_killed_after_a_stage_and_rerun_gives_the_same_result(kill_setup, tmp_path, point) -> None:
    out = tmp_path / "run"
    _folder_before(kill_setup, STAGE_OF_POINT[point], out)
    _killed_then_rerun(kill_setup, out, point, kill_setup.shared)


@pytest.mark.slow
@pytest.mark.timeout(KILL_TEST_TIMEOUT)
def test_killed_mid_evaluation_refuses_a_second_run_meanwhile_and_resumes(kill_setup, tmp_path) -> None:
    out = tmp_path / "run"
    _folder_before(kill_setup, "evaluate", out)
    refused: list[str] = []

    def second_run(pid: int) -> None:
        """The same command while the first run is alive: refused at once, naming it. The first
        is paused meanwhile (it keeps its lock), else it could finish before the second starts."""
        os.kill(pid, signal.SIGSTOP)
        res = subprocess.run([sys.executable, "-m", "polysemantic_disentangle.flows.cli", *kill_setup.command(out)],
                             env=kill_setup.shared, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 3, res.stderr[-3000:]
        assert f"output folder {out} is in use by pid {pid} on {socket.gethostname()}" in res.stderr
        refused.append(res.stderr)

    _killed_then_rerun(kill_setup, out, "external SIGKILL during evaluation", kill_setup.shared, stop_env=False,
                       kill_on=r"evaluation pass:", before_kill=second_run)
    assert len(refused) == 1, "the concurrent second run was not tried"


def test_every_stop_point_has_its_own_test() -> None:
    from polysemantic_disentangle.flows.runtime.faults import POINTS

    assert set(POINTS) == {"store-created", *EXTRACTION_POINTS, *STAGE_OF_POINT}
