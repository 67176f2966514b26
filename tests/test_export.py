"""Export behind the parity gate: a tiny model trained 2 steps on 2 ZeRO-3 ranks, exported with and without EMA,
in fp32 (bitwise) and bf16 (within the stated tolerance); planted faults fail the gate and leave nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import src.export as export_module
from src.checkpoint import load_model_weights
from src.export import BF16_TOLERANCE, ParityError, export, parity_gate
from src.run.transitions import apply_transition
from tests.conftest import ROOT
from tests.test_train import PARITY_EPS, train

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def trained(zero3_two_steps):
    return zero3_two_steps  # tests/conftest.py: 2 steps on 2 ZeRO-3 ranks, read here and never written


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


def test_exported_files_are_readable_by_others(trained, tmp_path):
    umask = os.umask(0o022)  # the usual umask; safetensors alone writes 0600 whatever it is
    try:
        export(trained, tmp_path / "out")
    finally:
        os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert modes == {"config.yaml": "0o644", "export.json": "0o644", "model.safetensors": "0o644"}


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


# --- diffusers FluxTransformer2DModel ---------------------------------------------------------------------------


def _random_nonzero_model():
    """A tiny MMDiT with every weight random and non-zero: a zero-initialised final layer would hide mistakes."""
    from src.models.mmdit import MMDiT
    from tests.conftest import tiny_model_kwargs

    torch.manual_seed(0)
    cfg = tiny_model_kwargs(attn_backend="sdpa")
    model = MMDiT(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return cfg, model


@torch.no_grad()
def test_the_mapping_reproduces_kiln_in_diffusers_and_renames_back_exactly():
    from diffusers import FluxTransformer2DModel

    from src.export import fixed_inputs
    from src.models.diffusers_flux import diffusers_forward, flux_config, from_diffusers, to_diffusers

    cfg, model = _random_nonzero_model()
    flux = FluxTransformer2DModel(**flux_config(cfg)).eval()
    flux.load_state_dict(to_diffusers(model.state_dict(), cfg["hidden"]), strict=True)
    inputs = fixed_inputs(model)
    expected, got = model(*inputs), diffusers_forward(flux, model, *inputs)
    assert (expected - got).abs().max() <= 1e-5 * expected.abs().max()  # measured: 3e-8 of a scale of 1.7
    back = from_diffusers(flux.state_dict(), list(model.state_dict()))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="cond_channels=17"):
        flux_config({**cfg, "cond_channels": 17})


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_diffusers_export_passes_its_gate_and_imports_back_exactly(trained, tmp_path, dtype):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    record = export(trained, tmp_path / "flux", ema=False, dtype=dtype, fmt="diffusers")
    parity = record["parity"]
    assert parity["passed"] and parity["round_trip_exact"] and parity["missing"] == parity["unexpected"] == []
    assert parity["dtypes"] == ["float32" if dtype == "fp32" else "bfloat16"]
    assert (tmp_path / "flux" / "config.json").is_file() and (tmp_path / "flux" / "kiln_config.yaml").is_file()
    if dtype == "fp32":  # sampled from, and init_from a diffusers folder: exactly Kiln's original weights
        from src.evaluation.sampling import load_run

        _, sampled, *_ = load_run(tmp_path / "flux")
        original, _ = load_model_weights(trained)
        assert all(torch.equal(v, original[k]) for k, v in sampled.state_dict().items())
        model = instantiate(OmegaConf.load(tmp_path / "flux" / "kiln_config.yaml").model)
        plan = apply_transition(model, tmp_path / "flux", [])
        assert {e["action"] for e in plan} == {"load"}
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_a_swapped_shift_and_scale_fails_the_diffusers_gate(trained, tmp_path):
    from omegaconf import OmegaConf

    from src.export import diffusers_gate

    out = tmp_path / "flux"
    export(trained, out, ema=False, fmt="diffusers")
    written = load_file(out / "diffusion_pytorch_model.safetensors")
    for key in ("norm_out.linear.weight", "norm_out.linear.bias"):  # FLUX's (shift, scale), not diffusers' order
        written[key] = torch.cat(written[key].chunk(2)[::-1]).contiguous()
    save_file(written, out / "diffusion_pytorch_model.safetensors")
    live, _ = load_model_weights(trained)
    with pytest.raises(ParityError, match='"round_trip_exact": false'):
        diffusers_gate(out, live, OmegaConf.load(out / "kiln_config.yaml").model, "fp32")


def test_a_two_step_fine_tune_starts_from_an_export(trained, tmp_path):
    export(trained, tmp_path / "export")
    rows = train(tmp_path / "finetune", "steps=2", f"init_from={tmp_path / 'export'}", PARITY_EPS)
    report = json.loads((tmp_path / "finetune" / "transition.json").read_text())
    exported, _ = load_model_weights(tmp_path / "export")
    assert report["tag"] == "export:step_00000002 (EMA)" and report["counts"] == {"load": len(exported)}
    assert [r["step"] for r in rows] == [1, 2]
