"""Export behind the parity gate: a tiny model trained 2 steps on 2 ZeRO-3 ranks, exported with and without EMA,
in fp32 (bitwise) and bf16 (within the stated tolerance); planted faults fail the gate and leave nothing."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import src.export as export_module
from src.checkpoint import load_model_weights
from src.curriculum import apply_transition
from src.export import BF16_TOLERANCE, ParityError, export, parity_gate
from tests.conftest import ROOT
from tests.test_train import PARITY_EPS, train

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    train(run_dir, "steps=2", PARITY_EPS)
    return run_dir


@pytest.mark.parametrize("ema", [True, False])
def test_fp32_export_reloads_bitwise(trained, tmp_path, ema):
    record = export(trained, tmp_path / "out", ema=ema)
    assert record["parity"]["passed"] and record["parity"]["max_abs_diff"] == 0.0
    assert record["parity"]["missing"] == record["parity"]["unexpected"] == record["parity"]["mis_shaped"] == []
    assert record["tag"] == "step_00000002" and record["ema"] is ema
    exported, tag = load_model_weights(tmp_path / "out")
    expected, _ = load_model_weights(trained, ema=ema)
    assert tag == f"export:step_00000002{' (EMA)' if ema else ''}"
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "export.json", "model.safetensors"]
    assert json.loads((tmp_path / "out" / "export.json").read_text())["parity"]["dtypes"] == ["float32"]


def test_bf16_export_is_within_the_stated_tolerance(trained, tmp_path):
    parity = export(trained / "checkpoints" / "step_00000002", tmp_path / "bf16", dtype="bf16")["parity"]
    assert parity["dtypes"] == ["bfloat16"] and parity["passed"]
    assert 0 < parity["max_abs_diff"] <= BF16_TOLERANCE * parity["output_scale"]


def _written(trained, tmp_path):
    out = tmp_path / "out"
    export(trained, out, ema=False)
    live, _ = load_model_weights(trained)
    return out, live, load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("dropped key", r"missing: \['final_layer.linear.bias'\]"),
        ("bf16 round trip stored as fp32", "outputs differ"),
        ("bf16 tensors where fp32 was asked", r"dtypes \['bfloat16'\], asked for fp32"),
        ("transposed weight", r"mis_shaped: \['img_in.weight'\]"),
    ],
)
def test_planted_faults_fail_the_gate(trained, tmp_path, fault, message):
    out, live, written = _written(trained, tmp_path)
    if fault == "dropped key":
        del written["final_layer.linear.bias"]
    elif fault == "bf16 round trip stored as fp32":
        written = {k: v.to(torch.bfloat16).float() for k, v in written.items()}
    elif fault == "bf16 tensors where fp32 was asked":
        written = {k: v.to(torch.bfloat16) for k, v in written.items()}
    else:
        written["img_in.weight"] = written["img_in.weight"].t().contiguous()
    save_file(written, out / "model.safetensors")
    with pytest.raises(ParityError, match=message):
        parity_gate(out, live, "fp32")


def test_a_failed_export_leaves_nothing_that_looks_finished(trained, tmp_path, monkeypatch):
    real_save = export_module.save_file
    monkeypatch.setattr(export_module, "save_file", lambda sd, path: real_save(dict(list(sd.items())[1:]), path))
    with pytest.raises(ParityError, match="missing"):
        export(trained, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_refuses_to_overwrite_and_exits_non_zero(trained, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("a user's file")
    proc = subprocess.run(
        [sys.executable, "-m", "src.export", str(trained), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "pass --force" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "a user's file"


def test_an_export_is_sampled_from_and_fine_tuned_from(trained, tmp_path):
    export(trained, tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "src.sample", str(tmp_path / "out"), "--prompt", "a red square", "--steps", "2",
         "--out", str(tmp_path / "videos"), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model = instantiate(OmegaConf.load(tmp_path / "out" / "config.yaml").model)
    plan = apply_transition(model, tmp_path / "out", [])  # init_from an export: every key loaded, unchanged
    exported, _ = load_model_weights(tmp_path / "out")
    assert {e["action"] for e in plan} == {"load"}
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
