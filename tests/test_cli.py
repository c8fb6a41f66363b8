"""The command line refuses bad parameters before any work, with a readable message."""

from __future__ import annotations

import pytest

from polysemantic_disentangle.flows.cli import build_parser, main, params_from_args


def test_bad_parameters_fail_fast(capsys) -> None:
    assert main(["run", "--tau", "2", "--p", "0", "--gamma", "3"]) == 2
    err = capsys.readouterr().err
    assert "tau must be in (0, 1]" in err and "p must be in (0, 1]" in err and "gamma must be in [-1, 1]" in err
    assert main(["run", "--rho-grid", "0.5,1.5"]) == 2
    assert "rho_grid" in capsys.readouterr().err


def test_flags_override_only_what_is_given() -> None:
    args = build_parser().parse_args(["run", "--gamma", "0.7", "--rewire-layers", "layer3.*,layer2.2.conv2",
                                      "--correct-only", "--max-per-class-train", "10"])
    params = params_from_args(args)
    assert params.gamma == 0.7 and params.correct_only and params.max_per_class_train == 10
    assert params.rewire_layers == ["layer3.*", "layer2.2.conv2"]
    assert params.tau == 0.03 and params.layers == "all"


def test_models_lists_the_registry(capsys) -> None:
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"cifar_resnet20", "efficientnet_lite0", "resnet50"} <= set(names)


def test_unknown_pipeline_parameter_is_an_error() -> None:
    from polysemantic_disentangle.flows.params import PipelineParams

    with pytest.raises(ValueError, match="extra"):
        PipelineParams(gama=0.5)


@pytest.mark.parametrize("damage", ["truncated", "binary", "empty"])
def test_show_names_a_damaged_run_file_and_the_fix(tmp_path, capsys, damage) -> None:
    from tests.test_cli_light import _tiny_run

    run = _tiny_run(tmp_path / "run")
    summary = run / "summary.json"
    text = summary.read_bytes()
    summary.write_bytes({"truncated": text[: len(text) // 2], "binary": b"\x89PNG\r\n\x1a\n\x00\xff",
                         "empty": b""}[damage])
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"disentangle: error: {summary} is damaged"), err
    assert f"--out-dir {run} again to recompute it" in err[0]
