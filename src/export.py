"""Export a checkpoint as a self-contained folder, behind a parity gate.

    python -m src.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--ema/--no-ema] [--dtype fp32|bf16] [--force]

OUT_DIR gets `model.safetensors` (the consolidated weights: the EMA by default), `config.yaml` (the run's resolved
config: model, VAE and text encoder, what `src.sample` and `init_from` rebuild from) and `export.json` (source,
tag, dtype, file hash and the gate's report).

The parity gate runs on every export: the written file is loaded strictly into a fresh model built from the
written config, and its output on fixed inputs is compared with the model holding the checkpoint's weights.
fp32 must be bitwise identical; bf16 within `BF16_TOLERANCE` of the output's scale. Key coverage (missing,
unexpected, mis-shaped), dtypes and the largest difference are reported. Everything is written to
`OUT_DIR.partial` first and renamed only when the gate passes: a failed export leaves nothing that looks finished,
and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from src.checkpoint import load_model_weights
from src.models.weights import file_sha256, strict_load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 keeps 8 bits of mantissa: weights rounded to bf16 move a tiny model's output by ~1e-3 of its scale.
BF16_TOLERANCE = 2e-2


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


@torch.no_grad()
def parity_gate(out_dir: Path, live: dict[str, torch.Tensor], dtype: str) -> dict:
    """Reload `out_dir` into a fresh model and compare it with a model holding `live` (fp32). Raises ParityError
    (with the report) when keys, dtypes or outputs disagree; returns the report otherwise."""
    cfg = OmegaConf.load(out_dir / "config.yaml")
    written = load_file(out_dir / "model.safetensors")
    report = {
        "dtype": dtype,
        "tensors": len(written),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in written.values()}),
        "missing": sorted(set(live) - set(written)),
        "unexpected": sorted(set(written) - set(live)),
        "mis_shaped": sorted(k for k in set(live) & set(written) if live[k].shape != written[k].shape),
    }
    problems = [f"{k}: {report[k][:10]}" for k in ("missing", "unexpected", "mis_shaped") if report[k]]
    if report["dtypes"] != [str(DTYPES[dtype]).removeprefix("torch.")]:
        problems.append(f"dtypes {report['dtypes']}, asked for {dtype}")
    if problems:
        raise ParityError("export parity gate: " + "; ".join(problems) + f"\n{json.dumps(report, indent=1)}")
    reference = instantiate(cfg.model).eval()
    strict_load(reference, live, "the checkpoint's weights")
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


def export(source: str | Path, out_dir: str | Path, ema: bool = True, dtype: str = "fp32", force: bool = False) -> dict:
    """Write the export folder for `source` (a run directory or a checkpoint folder) behind the parity gate."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
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
        "sha256": file_sha256(partial / "model.safetensors"),
        "parity": report,
    }
    (partial / "export.json").write_text(json.dumps(record, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory, or a checkpoint folder RUN/checkpoints/step_N")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="the EMA (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        record = export(args.source, args.out_dir, args.ema, args.dtype, args.force)
    except (ParityError, ValueError, FileExistsError) as err:
        print(f"export failed, nothing written to {args.out_dir}: {err}", file=sys.stderr)
        return 1
    parity = record["parity"]
    print(
        f"{args.out_dir}: {parity['tensors']} tensors ({', '.join(parity['dtypes'])}) from {record['tag']}"
        f"{' (EMA)' if record['ema'] else ''}; parity gate passed ({parity['criterion']}: max |diff| "
        f"{parity['max_abs_diff']:.3g} of output scale {parity['output_scale']:.3g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
