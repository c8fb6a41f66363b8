"""Hostile and odd inputs: one bad file never stops or hangs a run.

A decompression bomb, an image of another size, a named pipe, a directory and a dangling link
among real CIFAR-10 images are each recorded with their reason and left out of every statistic;
nothing opens the pipe; 16-bit grayscale keeps its picture; the report lists what was skipped."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from polysemantic_disentangle.tasks.data import images as img
from polysemantic_disentangle.tasks.stage6_report.report import build_summary, render_report, skipped_images, write_summary_json
from tests.conftest import add_bad_images, cifar_subset

BOMB_SIDE = 30_000  # 900 Mpixel, ten times PIL's default limit


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: about 100 kB on disk, 900 MB once decoded
    as RGB. Written by hand because PIL would allocate the whole image first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\0" * (1 + side // 8)) * 1000  # filter byte + packed bits, 1000 rows at a time
    z = zlib.compressobj(9)
    idat = b"".join([*(z.compress(rows) for _ in range(side // 1000)), z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


@pytest.fixture
def fifos():
    """Named pipes made by a test; afterwards any reader still blocked on one is released (a
    writer's open lets it through), so that a failing test cannot hang the test process."""
    made: list[Path] = []
    yield made
    for path in made:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing blocked
            pass


# The reason kind (``reason_kind``) each hostile file must be recorded with.
HOSTILE = {
    "zz_truncated.jpg": "OSError",
    "zz_not_an_image.jpg": "UnidentifiedImageError",
    "zz_bomb.png": img.TOO_MANY_PIXELS,
    "zz_big.png": img.WRONG_SIZE,
    "zz_pipe.jpg": img.NOT_REGULAR,
    "zz_folder.png": img.NOT_REGULAR,
    "zz_dangling.jpg": "FileNotFoundError",
}
# What file types and headers alone show (the preflight's screen): truncated pixel data does not.
SCREENED = {**HOSTILE, "zz_truncated.jpg": ""}


def add_hostile_files(folder: Path, cls: str, bomb: bytes, fifos: list[Path]) -> None:
    """The files of ``HOSTILE`` in ``folder/cls``, beside its real images (which sort first)."""
    kinds = add_bad_images(folder, cls)
    for name, kind in kinds.items():
        if kind == "ok":  # the converted images are usable: here only what must be skipped
            (folder / cls / name).unlink()
    target = folder / cls
    (target / "zz_bomb.png").write_bytes(bomb)
    first = sorted(p for p in target.iterdir() if p.suffix == ".jpg")[0]
    Image.open(first).convert("RGB").resize((64, 64)).save(target / "zz_big.png")
    os.mkfifo(target / "zz_pipe.jpg")
    fifos.append(target / "zz_pipe.jpg")
    (target / "zz_folder.png").mkdir()
    os.symlink(folder / "nowhere.jpg", target / "zz_dangling.jpg")


def _in_thread(fn, seconds: float = 60.0):
    """``fn()`` in a daemon thread; fails if it has not returned within ``seconds`` (it blocks)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


# --- single files ------------------------------------------------------------------------------


def test_sixteen_bit_grayscale_decodes_as_its_eight_bit_picture(tmp_path, assets_dir) -> None:
    photo = sorted((assets_dir / "cifar10" / "test" / "cat").iterdir())[0]
    eight = np.asarray(Image.open(photo).convert("L").resize((96, 96)), dtype=np.uint16)
    rng = np.random.default_rng(0)
    # The 16-bit picture of the same scene, with low bits the 8-bit one cannot hold.
    sixteen = np.clip(eight * 257 + rng.integers(-128, 129, eight.shape), 0, 65535).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    tensor, reason = img.load_image(tmp_path / "gray16.png", T.ToTensor())
    assert reason == "" and tuple(tensor.shape) == (3, 96, 96)
    levels = np.rint(tensor.numpy() * 255)
    for channel in levels:
        assert np.abs(channel - eight).max() <= 1
    assert levels.mean() == pytest.approx(eight.mean(), abs=0.5)  # not the all-white image


@pytest.mark.parametrize("name,mode,options", [
    ("baseline.jpg", "RGB", {}),
    ("progressive.jpg", "RGB", {"progressive": True, "quality": 80}),
    ("exif.jpg", "RGB", {"exif": b"Exif\0\0" + b"\0" * 5000}),  # a long segment before the frame
    ("cmyk.jpg", "CMYK", {}),
    ("gray.png", "L", {}),
    ("rgba.png", "RGBA", {}),
    ("image.bmp", "RGB", {}),  # read by PIL's parser, not the PNG/JPEG one
])
def test_header_sizes_are_pil_sizes(tmp_path, name, mode, options) -> None:
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    picture.convert(mode).save(tmp_path / name, **options)
    reason, size = img.header_check(tmp_path / name)
    assert reason == "" and size == Image.open(tmp_path / name).size == (53, 37)


def test_a_named_pipe_is_never_opened(tmp_path, fifos) -> None:
    pipe = tmp_path / "x.jpg"
    os.mkfifo(pipe)
    fifos.append(pipe)
    with pytest.raises(img.NotRegularFile, match="named pipe"):
        _in_thread(lambda: img.open_regular(pipe))
    tensor, reason = _in_thread(lambda: img.load_image(pipe, T.ToTensor()))
    assert tensor is None and reason == "not a regular file: named pipe (FIFO)"
    assert _in_thread(lambda: img.header_check(pipe)) == (reason, None)
    # A link to a regular file is a regular file (the test data are ImageFolders of links).
    Image.new("RGB", (4, 4)).save(tmp_path / "real.png")
    os.symlink(tmp_path / "real.png", tmp_path / "link.png")
    assert img.load_image(tmp_path / "link.png", T.ToTensor())[1] == ""


def test_the_pixel_limit_is_the_one_given(tmp_path, bomb, monkeypatch) -> None:
    Image.new("RGB", (100, 80), (200, 10, 10)).save(tmp_path / "small.png")
    (tmp_path / "bomb.png").write_bytes(bomb)
    tensor, reason = img.load_image(tmp_path / "small.png", T.ToTensor(), max_image_pixels=7_999)
    assert tensor is None and reason.startswith("too many pixels: 100x80 = 8,000 pixels") and "7,999" in reason
    assert img.load_image(tmp_path / "small.png", T.ToTensor(), max_image_pixels=8_000)[1] == ""
    assert img.header_check(tmp_path / "small.png", 7_999)[0] == reason
    # PIL's own global limit (restored afterwards) would refuse 8,000 pixels inside Image.open;
    # a lower limit leaves it alone, a higher one decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    tensor, reason = img.load_image(tmp_path / "small.png", T.ToTensor(), max_image_pixels=999)
    assert tensor is None and img.reason_kind(reason) == img.TOO_MANY_PIXELS and Image.MAX_IMAGE_PIXELS == 1_000
    assert img.load_image(tmp_path / "small.png", T.ToTensor(), max_image_pixels=8_000)[1] == ""
    tensor, reason = img.load_image(tmp_path / "bomb.png", T.ToTensor())
    assert tensor is None and img.reason_kind(reason) == img.TOO_MANY_PIXELS and "89,478,485" in reason
    assert img.header_check(tmp_path / "bomb.png", BOMB_SIDE**2) == ("", (BOMB_SIDE, BOMB_SIDE))
    assert img.reason_kind(img.header_check(tmp_path / "bomb.png", BOMB_SIDE**2 - 1)[0]) == img.TOO_MANY_PIXELS


def test_a_corrupt_jpeg_segment_cannot_loop(tmp_path) -> None:
    (tmp_path / "loop.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x00" + b"\0" * 100)  # length 0
    reason, size = _in_thread(lambda: img.header_check(tmp_path / "loop.jpg"), 10)
    assert img.reason_kind(reason) == "UnidentifiedImageError" and size is None


def test_the_limit_goes_from_the_parameters_into_the_store(tmp_path, assets_dir) -> None:
    from polysemantic_disentangle.flows.cli import build_parser, params_from_args
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.storage.cube import CubeMismatch, open_store_group
    from polysemantic_disentangle.tasks import defaults
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube, planned_pixel_limit

    assert params_from_args(build_parser().parse_args(["run", "--max-image-pixels", "1023"])).max_image_pixels == 1023
    assert PipelineParams().max_image_pixels == defaults.MAX_IMAGE_PIXELS == 89_478_485
    with pytest.raises(ValueError, match="max_image_pixels"):
        PipelineParams(max_image_pixels=0)
    bundle = load_model("cifar_resnet20")
    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=1)
    url = str(tmp_path / "cube.zarr")
    assert planned_pixel_limit(url) == defaults.MAX_IMAGE_PIXELS  # no store yet
    # 1,023 pixels: every 32x32 image (1,024) is over the limit.
    plan = plan_cube(bundle, str(data), url, ["layer1.0.conv1"], 16, "label", max_image_pixels=1023)
    assert planned_pixel_limit(url) == 1023
    with pytest.raises(CubeMismatch):  # another limit, another store
        plan_cube(bundle, str(data), url, ["layer1.0.conv1"], 16, "label")
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks), plan.layers,
                   batch_size=16, input_size=bundle.input_size)
    root = open_store_group(url)
    assert root["skipped"][:].all()
    assert all(str(r).startswith("too many pixels: 32x32 = 1,024 pixels, above max_image_pixels 1,023")
               for r in root["skip_reason"][:])


def test_load_batch_and_screen_record_every_bad_file(tmp_path, assets_dir, bomb, fifos) -> None:
    from polysemantic_disentangle.tasks.models.registry import load_model

    bundle = load_model("cifar_resnet20")
    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=2)
    add_hostile_files(data, "cat", bomb, fifos)
    paths = sorted(f"cat/{p.name}" for p in (data / "cat").iterdir())
    images, ok, reasons = _in_thread(lambda: img.load_batch(data, paths, bundle.transform,
                                                            input_size=bundle.input_size))
    kinds = {p.split("/")[1]: img.reason_kind(r) if r else "" for p, r in zip(paths, reasons)}
    assert kinds == {**HOSTILE, **{p.split("/")[1]: "" for p in paths if not p.split("/")[1].startswith("zz_")}}
    assert ok.sum() == 2 and tuple(images.shape) == (2, 3, 32, 32)
    assert "64x64" in reasons[paths.index("cat/zz_big.png")] and "3x32x32" in reasons[paths.index("cat/zz_big.png")]
    # Without the model's size the batch's most common size wins: still no failed stack.
    images, ok, _ = img.load_batch(data, paths, bundle.transform)
    assert ok.sum() == 2 and tuple(images.shape) == (2, 3, 32, 32)
    screened = _in_thread(lambda: img.screen_images(data, paths, bundle.transform, bundle.input_size))
    assert {p.split("/")[1]: img.reason_kind(r) if r else "" for p, r in zip(paths, screened)
            if p.split("/")[1].startswith("zz_")} == SCREENED


# --- the report ----------------------------------------------------------------------------------


def test_report_lists_skipped_images_of_both_cubes(tmp_path) -> None:
    n = 250
    paths = [f"cat/{i:04d}.jpg" for i in range(n + 10)]
    skipped = [i < n for i in range(n + 10)]
    reasons = [("not a regular file: named pipe (FIFO)" if i % 5 == 0 else
                "too many pixels: 30000x30000 = 900,000,000 pixels, above max_image_pixels 89,478,485"
                if i % 5 == 1 else "OSError: image file is truncated") if i < n else "" for i in range(n + 10)]
    train = skipped_images(paths, skipped, reasons)
    assert train["n_skipped"] == n and train["not_listed"] == n - 200 and len(train["images"]) == 200
    assert train["by_reason"] == {"OSError": 150, "not a regular file": 50, "too many pixels": 50}
    assert train["images"][0] == {"path": "cat/0000.jpg", "reason": reasons[0]}
    evaluation = skipped_images(["dog/a.png", "dog/b.png"], [False, True],
                                ["", "wrong size: a 64x64 image is 3x64x64 after the transform; the model takes 3x32x32"])
    assert evaluation == {"n_skipped": 1, "by_reason": {"wrong size": 1}, "not_listed": 0,
                          "images": [{"path": "dog/b.png", "reason": evaluation["images"][0]["reason"]}]}
    summary = build_summary(params={"max_image_pixels": 89_478_485},
                            skipped={"detection": train, "evaluation": evaluation})
    written = json.loads(write_summary_json(tmp_path / "summary.json", summary).read_text())
    assert written["skipped_images"]["detection"]["n_skipped"] == n
    page = render_report(summary, {})
    assert "id='skipped'" in page and "250 of the detection images" in page and "1 of the evaluation images" in page
    assert "cat/0000.jpg" in page and "dog/b.png" in page and "named pipe (FIFO)" in page
    assert "cat/0199.jpg" in page and "cat/0200.jpg" not in page and "50 more are not listed" in page
    quiet = render_report(build_summary(params={}, skipped={"detection": skipped_images(["a"], [False], [""])}), {})
    assert "none skipped" in quiet and "of the detection images" not in quiet


# --- a whole run -----------------------------------------------------------------------------

# Two layers, few images, one chunk and one batch per cube: the good images of the hostile and the
# clean folder then meet the model in the same batch and are summed in the same order, so their
# statistics agree to the bit.
RUN = ["--layers", "layer3.2.conv1,layer3.2.conv2", "--chunk-images", "128", "--batch-size", "128",
       "--check-images", "20", "--rho-max-images", "8", "--p", "0.5", "--max-rewired-per-layer", "1",
       "--featvis-channels", "0"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_over_hostile_folders_completes_with_the_clean_statistics(tmp_path, assets_dir, bomb, fifos,
                                                                     prefect_api) -> None:
    from polysemantic_disentangle.flows.cli import EXIT_NOTHING_TO_REWIRE, main
    from polysemantic_disentangle.storage.cube import open_store_group
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube

    train = cifar_subset(assets_dir, tmp_path / "train", "train", per_class=10)
    evaluation = cifar_subset(assets_dir, tmp_path / "eval", "test", per_class=5)
    clean = cifar_subset(assets_dir, tmp_path / "clean", "train", per_class=10)
    add_hostile_files(train, "cat", bomb, fifos)
    add_hostile_files(evaluation, "dog", bomb, fifos)
    out = tmp_path / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        # In this thread (the CLI installs signal handlers); the test's timeout bounds a hang.
        rc = main(["run", "--train-dir", str(train), "--eval-dir", str(evaluation), "--out-dir", str(out), *RUN])
    assert rc in (0, EXIT_NOTHING_TO_REWIRE), buf.getvalue()[-3000:]
    stdout = buf.getvalue()
    assert "107 images in 10 folders" in stdout and "57 images in 10 folders" in stdout

    # The preflight counted what types and headers show, before any model pass.
    preflight = json.loads((out / "preflight.json").read_text())
    expected = {}
    for kind in SCREENED.values():
        if kind:
            expected[kind] = expected.get(kind, 0) + 1
    for role in ("train", "eval"):
        assert preflight[role]["unusable"] == expected, role
    assert "6 will be skipped" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert any("6 will be skipped" in line for line in summary["extra"]["preflight"])

    # Each cube records every hostile file with its reason, and nothing else as skipped.
    for cube, cls in (("cube-train.zarr", "cat"), ("cube-eval.zarr", "dog")):
        root = open_store_group(out / cube)
        paths = [str(p) for p in root["image_path"][:]]
        reasons = [str(r) for r in root["skip_reason"][:]]
        flagged = {p.split("/")[1]: img.reason_kind(r) for p, s, r in zip(paths, root["skipped"][:], reasons) if s}
        assert flagged == HOSTILE, cube
        assert all(p.startswith(f"{cls}/zz_") for p, s in zip(paths, root["skipped"][:]) if s)
        # ... and the report lists the same files with the same reasons.
        listed = summary["skipped_images"]["detection" if cube == "cube-train.zarr" else "evaluation"]
        assert listed["n_skipped"] == len(HOSTILE)
        assert {i["path"]: i["reason"] for i in listed["images"]} == {
            p: r for p, s, r in zip(paths, root["skipped"][:], reasons) if s}
    assert "Skipped images" in (out / "report.html").read_text()

    # The statistics are those of the same folder without the bad files, to the bit.
    bundle = load_model("cifar_resnet20")
    url = str(tmp_path / "clean.zarr")
    plan = plan_cube(bundle, str(clean), url, ["layer3.2.conv1", "layer3.2.conv2"], chunk_images=128,
                     target_mode="label")
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(clean), range(plan.n_chunks), plan.layers,
                   batch_size=128, input_size=bundle.input_size)
    got, want = reduce_cube(str(out / "cube-train.zarr"), tau=0.03), reduce_cube(url, tau=0.03)
    assert set(got) == set(want) == {"layer3.2.conv1", "layer3.2.conv2"}
    for layer in want:
        assert got[layer].count.tolist() == [10.0] * 10
        for field in ("count", "mean_relevance", "important_fraction", "mean_activation", "mean_moments"):
            np.testing.assert_array_equal(getattr(got[layer], field), getattr(want[layer], field),
                                          err_msg=f"{layer} {field}")
