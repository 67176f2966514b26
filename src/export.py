"""Export a checkpoint as a self-contained folder, behind a parity gate.

    python -m src.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--ema/--no-ema] [--dtype fp32|bf16]
                         [--format kiln|diffusers] [--force]

OUT_DIR gets `model.safetensors` (the consolidated weights: the EMA by default), `config.yaml` (the run's resolved
config: model, VAE and text encoder, what `src.sample` and `init_from` rebuild from) and `export.json` (source,
tag, dtype, file hash and the gate's report). `--format diffusers` writes instead the diffusers
`FluxTransformer2DModel` folder (`config.json`, `diffusion_pytorch_model.safetensors`; `src/models/diffusers_flux.py`)
for text-to-video models without `cond_in`, plus `kiln_config.yaml` and `export.json`.

The parity gate runs on every export: the written file is loaded strictly into a fresh model built from the
written config, and its output on fixed inputs is compared with the model holding the checkpoint's weights.
fp32 must be bitwise identical; bf16 within `BF16_TOLERANCE` of the output's scale. The diffusers folder is
loaded by diffusers' own `from_pretrained`, fed 3D position ids, and must match within `FP32_DIFFUSERS_TOLERANCE`
(another implementation: float sums in another order); its weights, renamed back, must equal Kiln's exactly.
Key coverage (missing, unexpected, mis-shaped), dtypes and the largest difference are reported. Everything is written to
`OUT_DIR.partial` first and renamed only when the gate passes: a failed export leaves nothing that looks finished,
and the command exits non-zero. Exported files are readable by others (0644 under the usual umask 022), not 0600 as
safetensors writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from src.checkpoint import load_model_weights
from src.cli import HelpFormatter
from src.models.weights import file_sha256, strict_load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 keeps 8 bits of mantissa: weights rounded to bf16 move a tiny model's output by ~1e-3 of its scale.
BF16_TOLERANCE = 2e-2
# diffusers computes the same maths in another order (fused RoPE, its own attention call): ~1e-8 of the scale.
FP32_DIFFUSERS_TOLERANCE = 1e-5
FORMATS = ("kiln", "diffusers")
WEIGHTS_FILE = {"kiln": "model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}


class ParityError(RuntimeError):
    """The exported weights do not reproduce the model they came from."""


def source_config(source: Path) -> tuple[DictConfig, Path]:
    """(the run's resolved config, the run directory) of a run directory or one of its checkpoint folders."""
    for run_dir in (source, source.parent.parent):
        if (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir():
            return OmegaConf.load(run_dir / "config.yaml"), run_dir
    raise ValueError(f"{source} is neither a Kiln run directory nor a checkpoint folder inside one (no config.yaml)")


def fixed_inputs(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x (1, C, 2pt, 2ph, 2pw), txt (1, 7, D), vec (1, Dv), t (1,): seeded, with a text length no bucket uses."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = model.patch_size
    x = torch.randn(1, model.in_channels, 2 * pt, 2 * ph, 2 * pw, generator=g)
    txt = torch.randn(1, 7, model.txt_in.in_features, generator=g)
    vec = torch.randn(1, model.vector_in.in_layer.in_features, generator=g)
    return x, txt, vec, torch.tensor([0.37])


def coverage(expected: dict[str, torch.Size], written: dict[str, torch.Tensor], dtype: str) -> dict:
    """Key coverage and dtypes of written tensors against the names and shapes they must have; ParityError when
    any key is missing, unexpected or mis-shaped, or a tensor is not in `dtype`."""
    report = {
        "dtype": dtype,
        "tensors": len(written),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in written.values()}),
        "missing": sorted(set(expected) - set(written)),
        "unexpected": sorted(set(written) - set(expected)),
        "mis_shaped": sorted(k for k in set(expected) & set(written) if expected[k] != written[k].shape),
    }
    problems = [f"{k}: {report[k][:10]}" for k in ("missing", "unexpected", "mis_shaped") if report[k]]
    if report["dtypes"] != [str(DTYPES[dtype]).removeprefix("torch.")]:
        problems.append(f"dtypes {report['dtypes']}, asked for {dtype}")
    if problems:
        raise ParityError("export parity gate: " + "; ".join(problems) + f"\n{json.dumps(report, indent=1)}")
    return report


def _reference(model_cfg, live: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = instantiate(model_cfg).eval()
    strict_load(model, live, "the checkpoint's weights")
    return model


@torch.no_grad()
def parity_gate(out_dir: Path, live: dict[str, torch.Tensor], dtype: str) -> dict:
    """Reload `out_dir` into a fresh model and compare it with a model holding `live` (fp32). Raises ParityError
    (with the report) when keys, dtypes or outputs disagree; returns the report otherwise."""
    cfg = OmegaConf.load(out_dir / "config.yaml")
    written = load_file(out_dir / "model.safetensors")
    report = coverage({k: v.shape for k, v in live.items()}, written, dtype)
    reference = _reference(cfg.model, live)
    reloaded = instantiate(cfg.model).eval()
    strict_load(reloaded, {k: v.float() for k, v in written.items()}, f"{out_dir / 'model.safetensors'}")
    inputs = fixed_inputs(reference)
    expected, got = reference(*inputs), reloaded(*inputs)
    report["max_abs_diff"] = (expected - got).abs().max().item()
    report["output_scale"] = expected.abs().max().item()
    if dtype == "fp32":
        report["criterion"] = "bitwise equal outputs"
        ok = torch.equal(expected, got)
    else:
        report["criterion"] = f"max |diff| <= {BF16_TOLERANCE} x max |output|"
        ok = report["max_abs_diff"] <= BF16_TOLERANCE * max(report["output_scale"], 1e-12)
    report["passed"] = bool(ok)
    if not ok:
        raise ParityError(f"export parity gate: outputs differ\n{json.dumps(report, indent=1)}")
    return report


@torch.no_grad()
def diffusers_gate(out_dir: Path, live: dict[str, torch.Tensor], model_cfg, dtype: str) -> dict:
    """Load `out_dir` with diffusers' own `FluxTransformer2DModel.from_pretrained`, feed it Kiln's fixed inputs
    with (t, h, w) position ids, compare with the Kiln model holding `live`; renamed back, the written weights must
    equal `live` exactly (fp32) or to bf16 rounding. Raises ParityError with the report."""
    from diffusers import FluxTransformer2DModel

    from src.models.diffusers_flux import diffusers_forward, from_diffusers

    reference = _reference(model_cfg, live)
    fresh = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(out_dir))
    written = load_file(out_dir / "diffusion_pytorch_model.safetensors")
    report = coverage({k: v.shape for k, v in fresh.state_dict().items()}, written, dtype)
    back = from_diffusers(written, list(live))
    report["round_trip_exact"] = all(torch.equal(back[k].float(), live[k].to(DTYPES[dtype]).float()) for k in live)
    flux = FluxTransformer2DModel.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    inputs = fixed_inputs(reference)
    expected, got = reference(*inputs), diffusers_forward(flux, reference, *inputs)
    report["max_abs_diff"] = (expected - got).abs().max().item()
    report["output_scale"] = expected.abs().max().item()
    tolerance = FP32_DIFFUSERS_TOLERANCE if dtype == "fp32" else BF16_TOLERANCE
    report["criterion"] = f"diffusers output: max |diff| <= {tolerance} x max |output|; weights renamed back equal"
    report["passed"] = report["round_trip_exact"] and report["max_abs_diff"] <= tolerance * max(
        report["output_scale"], 1e-12
    )
    if not report["passed"]:
        raise ParityError(f"diffusers export parity gate failed\n{json.dumps(report, indent=1)}")
    return report


def _write_diffusers(partial: Path, cfg, live: dict[str, torch.Tensor], dtype: str) -> dict:
    from diffusers import FluxTransformer2DModel

    from src.models.diffusers_flux import flux_config, to_diffusers

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    flux = FluxTransformer2DModel(**flux_config(model_cfg))
    flux.load_state_dict(to_diffusers(live, model_cfg["hidden"]), strict=True)
    flux.to(DTYPES[dtype]).save_pretrained(partial, safe_serialization=True)
    (partial / "kiln_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return diffusers_gate(partial, live, cfg.model, dtype)


def export(
    source: str | Path,
    out_dir: str | Path,
    ema: bool = True,
    dtype: str = "fp32",
    force: bool = False,
    fmt: str = "kiln",
) -> dict:
    """Write the export folder for `source` (a run directory or a checkpoint folder) behind the parity gate."""
    if dtype not in DTYPES or fmt not in FORMATS:
        raise ValueError(f"dtype {dtype!r} / format {fmt!r}: choose from {sorted(DTYPES)} / {list(FORMATS)}")
    source, out_dir = Path(source), Path(out_dir)
    cfg, run_dir = source_config(source)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --force to replace it")
    tag = source.name if source != run_dir else None
    live, tag = load_model_weights(run_dir, tag, ema=ema)  # fp32, consolidated from the shards
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if fmt == "diffusers":
            report = _write_diffusers(partial, cfg, live, dtype)
        else:
            save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in live.items()}, partial / "model.safetensors")
            (partial / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            report = parity_gate(partial, live, dtype)
    except Exception:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    record = {
        "source": str(run_dir.resolve()),
        "tag": tag,
        "ema": ema,
        "format": fmt,
        "sha256": file_sha256(
            partial / ("model.safetensors" if fmt == "kiln" else "diffusion_pytorch_model.safetensors")
        ),
        "parity": report,
    }
    (partial / "export.json").write_text(json.dumps(record, indent=1))
    _readable_by_others(partial)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return record


def _readable_by_others(folder: Path) -> None:
    """Give every file under `folder` the mode a new file of this user gets (0666 less the umask: 0644 under 022).

    safetensors writes 0600, which a serving job or a teammate under another user cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory, or a checkpoint folder RUN/checkpoints/step_N")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="the EMA (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--format", choices=FORMATS, default="kiln", help="kiln, or diffusers FluxTransformer2DModel")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        record = export(args.source, args.out_dir, args.ema, args.dtype, args.force, args.format)
    except (ParityError, ValueError, FileExistsError) as err:
        print(f"export failed, nothing written to {args.out_dir}: {err}", file=sys.stderr)
        return 1
    parity = record["parity"]
    print(
        f"{args.out_dir}: {parity['tensors']} tensors ({', '.join(parity['dtypes'])}) from {record['tag']}"
        f"{' (EMA)' if record['ema'] else ''}, {record['format']} format; parity gate passed "
        f"({parity['criterion']}: max |diff| {parity['max_abs_diff']:.3g} of output scale {parity['output_scale']:.3g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
