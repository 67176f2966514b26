"""The text-encoder canary: does a loaded encoder give features that mean something, and the features it gave before?

A T5 loaded wrongly once made every precomputed text feature worthless (every trained video came out black) while
training looked fine. Strict loading (`src.models.text.load_strict`) catches missing or unexpected tensors; this
canary catches the rest (a wrong tokenizer, a dtype overflow, a transformers change, weights that load but are not
the trained ones) by encoding fixed probe prompts right after loading and checking, per feature set:

1. finite: no NaN or inf anywhere in the probe features (token features, padding included, and vectors).
2. scale: the RMS of the probe vectors and of every non-padding token feature lies in [1e-4, 1e4]. Real encoders
   end in a LayerNorm/RMSNorm (RMS around 0.05-5); the range only catches zeros and blow-ups.
3. variation: the features vary across prompts (the variance across prompts, averaged over dimensions, is at least
   1e-3 of the mean square) and across the tokens of a prompt (likewise). A constant or input-blind encoder fails.
   Real encoders can be strongly anisotropic (cosines of 0.9 and more between unrelated prompts' vectors), which
   still leaves a relative variance of several percent (about 1 - cosine): the floor is far below that.
4. distinct: every two different probe prompts (the empty prompt included) give vectors at least 1e-3 apart,
   relative to their RMS norm. Paraphrases of a real encoder are 0.2 or more apart.
5. semantics: on TRIPLETS of (anchor, paraphrase, unrelated) prompts, the paraphrase must be nearer to the anchor
   than the unrelated prompt, consistently. The probe is built so that surface form favours the wrong answer:
   the paraphrase shares no content word with the anchor, the unrelated prompt has the same length in words and
   shares exactly the same function words at the same places ("a dog is running on the beach" / "a puppy is
   sprinting on the shore" / "a senator is voting on the bill"); with the MiniLM WordPiece tokenizer the unrelated
   prompt shares as many tokens with the anchor as the paraphrase does in every triplet and is never longer (rarer
   paraphrase words split into more pieces), so an encoder that only sees tokens (a random one) has no reason to
   prefer the paraphrase, and with subword tokenizers prefers the unrelated prompt. Vectors are centred on the mean
   of all triplet prompts (removing the direction every prompt shares, large in T5 and CLIP), then per triplet
   margin = cos(anchor, paraphrase) - cos(anchor, unrelated); over the 24 triplets the mean margin must be at least
   0.02 and its effect size t = mean / (std / sqrt(24)) at least 4. For an encoder blind to meaning the margins are
   zero-mean noise (or worse), and t >= 4 has a chance of about 3e-4 (one-sided Student t, 23 degrees of freedom).
   Measured: real all-MiniLM-L6-v2 t = 22.6 (mean margin 0.58, 24/24 positive); MiniLM re-initialised at random,
   t in [-4.8, -1.2] over 40 seeds; tiny random T5 and CLIP with a word-level tokenizer (no subword bias), t in
   [-3.5, 2.3] and [-2.2, 2.1] over 30 seeds. For a real encoder t grows with sqrt(number of triplets): passing
   needs mean/std of the margins >= 0.82, i.e. the paraphrase nearer in clearly most triplets, which these
   clear-cut scene/off-topic pairs give any encoder with word-level semantics (mean-pooled T5 features keep the
   meaning of their words; CLIP's end-of-text vector is trained for retrieval). Real T5-XXL and CLIP-L could not be
   run here, hence these conservative thresholds; a stricter margin would need a measurement on them. Limitation:
   an encoder whose word embeddings are right but whose layers are random still passes (MiniLM so: t = 10-11);
   the fingerprint catches that for a recorded encoder.
6. fingerprint: where `fingerprints.json` holds a reference for this encoder (by the provenance fields named in its
   `fingerprint_fields`: weights hash and dtype, for T5+CLIP also max lengths and mask convention), a few summary
   numbers of the probe features (`fingerprint_numbers`) must match it within a tolerance set by the dtype
   (TOLERANCE: float32 5e-3, float16 1e-2, bfloat16 3e-2; relative for rms/spread, absolute for cosines and the
   projections, which are O(1)). It catches a wrong tokenizer or a changed code path that still looks meaningful.
   Re-record with `python -m src.models.canary --text <config> --record` after a deliberate change.

`check_features(name, vectors, tokens, mask)` runs checks 1-5 on given features (so a test can show that all-zero
features fail); `run_canary(encoder)` encodes PROMPTS with an encoder and adds the fingerprint. A failure raises
`CanaryError` (a ValueError) naming each failed check with its numbers.

Command line (no Hydra): `python -m src.models.canary --text conf/text/minilm.yaml [--set key=value ...] [--record]`
prints the report; `--record` stores the fingerprint of that encoder in `src/models/fingerprints.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from src.cli import HelpFormatter

FINGERPRINTS = Path(__file__).with_name("fingerprints.json")

# (anchor, paraphrase, unrelated): the paraphrase shares no content word with the anchor; the unrelated prompt has
# the paraphrase's length in words and shares exactly the same words with the anchor (function words only).
TRIPLETS: tuple[tuple[str, str, str], ...] = (
    ("a dog is running on the beach", "a puppy is sprinting on the shore", "a senator is voting on the bill"),
    (
        "a man is cooking pasta in the kitchen",
        "a chef is preparing noodles in the restaurant",
        "a satellite is orbiting planets in the galaxy",
    ),
    (
        "a woman rides a bicycle down the street",
        "a lady pedals a bike along the road",
        "a lawyer files a lawsuit against the company",
    ),
    ("a car drives fast on the highway", "a vehicle speeds quickly on the freeway", "a poet reads softly on the radio"),
    (
        "children are playing soccer in the park",
        "kids are kicking footballs in the playground",
        "investors are trading bonds in the exchange",
    ),
    ("a cat sleeps on the sofa", "a kitten naps on the couch", "a tax applies on the income"),
    (
        "waves crash against the rocks at sunset",
        "surf pounds against the cliffs at dusk",
        "shares rise against the dollar at noon",
    ),
    ("a bird flies over the lake", "a seagull soars over the pond", "a debate continues over the budget"),
    ("a person is typing on a laptop", "a programmer is coding on a computer", "a judge is ruling on a case"),
    ("snow falls on the mountains", "flurries descend on the peaks", "taxes rise on the imports"),
    ("a horse gallops across the field", "a pony runs across the meadow", "a rumor spreads across the internet"),
    ("a baby is laughing in the crib", "a toddler is giggling in the cradle", "a clerk is filing in the office"),
    (
        "the city skyline glows at night",
        "the downtown towers sparkle at dusk",
        "the annual budget passes at noon",
    ),
    ("a boat sails across the ocean", "a ship cruises across the sea", "a policy changes across the country"),
    (
        "a guitarist plays music on the stage",
        "a singer performs songs on the platform",
        "a bank charges fees on the account",
    ),
    (
        "a chef slices vegetables with a knife",
        "a cook chops carrots with a blade",
        "a nation negotiates treaties with a neighbor",
    ),
    ("a girl is swimming in the pool", "a kid is paddling in the water", "a firm is investing in the startup"),
    ("a plane lands on the runway", "a jet touches down on the airstrip", "a court rules firmly on the appeal"),
    ("fireworks explode in the night sky", "rockets burst in the dark heavens", "profits grow in the third quarter"),
    ("a cyclist climbs a steep hill", "a rider ascends a sharp slope", "a banker signs a large loan"),
    (
        "an old man reads a newspaper on a bench",
        "an elderly gentleman studies a magazine on a seat",
        "an angry customer disputes a charge on a bill",
    ),
    (
        "a dancer spins gracefully across the floor",
        "a ballerina twirls elegantly across the stage",
        "a currency drops sharply across the markets",
    ),
    ("a train arrives at the station", "a locomotive pulls into the depot", "a bill passes through the senate"),
    (
        "two friends are drinking coffee together",
        "two buddies are sipping espresso together",
        "two agencies are auditing taxes together",
    ),
)
EMPTY = ""
PROMPTS: tuple[str, ...] = (*(p for triplet in TRIPLETS for p in triplet), EMPTY)

RMS_RANGE = (1e-4, 1e4)  # check 2: RMS of vectors and of every non-padding token feature
SPREAD_MIN = 1e-3  # check 3: relative variance across prompts, and across the tokens of a prompt
DISTINCT_MIN = 1e-3  # check 4: smallest distance between two prompts' vectors, relative to their RMS norm
EFFECT_MIN = 4.0  # check 5: t = mean margin / (std / sqrt(n)) over the triplets
MARGIN_MIN = 0.02  # check 5: mean margin (difference of centred cosines)
TOLERANCE = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 3e-2}  # check 6, by the encoder's dtype
RELATIVE = ("rms", "token_rms", "spread")  # fingerprint numbers compared relatively (others absolutely)


class CanaryError(ValueError):
    """A text encoder failed its canary. `failures` maps "set.check" to what was measured and required."""

    def __init__(self, failures: dict[str, str], report: dict[str, Any] | None = None):
        self.failures = failures
        self.report = report or {}
        lines = "\n".join(f"  {name}: {why}" for name, why in failures.items())
        super().__init__(
            f"text encoder canary failed ({', '.join(failures)}): the features would be worthless for training\n{lines}"
        )


def _pairwise_cos(v: torch.Tensor) -> torch.Tensor:
    unit = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return unit @ unit.T


def _directions(dim: int) -> torch.Tensor:
    """Four fixed random unit directions in `dim` dimensions (the same on every machine)."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, dim, generator=g, dtype=torch.float64)
    return r / r.norm(dim=-1, keepdim=True)


def measure(
    vectors: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """Checks 1-5 on the features of PROMPTS: (numbers measured, failures: check -> explanation).

    vectors: (N, D), one per prompt of PROMPTS in order; tokens: (N, L, D) token features or None; mask: (N, L) bool,
    True at real tokens (None: all real).
    """
    n = len(PROMPTS)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"canary vectors must be ({n}, D) for the {n} probe prompts, got {tuple(vectors.shape)}")
    v = vectors.detach().double().cpu()
    t = None if tokens is None else tokens.detach().double().cpu()
    if t is not None and (t.ndim != 3 or t.shape[0] != n):
        raise ValueError(f"canary token features must be ({n}, L, D), got {tuple(t.shape)}")
    m = None if t is None else (torch.ones(t.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu())
    numbers: dict[str, float] = {}
    failures: dict[str, str] = {}

    # 1. finite
    bad = int((~torch.isfinite(v)).sum()) + (0 if t is None else int((~torch.isfinite(t)).sum()))
    numbers["non_finite"] = bad
    if bad:
        failures["finite"] = f"{bad} NaN/inf values in the probe features"
        return numbers, failures

    # 2. scale
    rms = float(v.pow(2).mean().sqrt())
    numbers["rms"] = rms
    lo, hi = RMS_RANGE
    scale = [] if lo <= rms <= hi else [f"vector RMS {rms:.3g}"]
    if t is not None:
        token_rms = t.pow(2).mean(-1).sqrt()[m]  # (real tokens,)
        numbers["token_rms"] = float(token_rms.mean())
        numbers["token_rms_min"], numbers["token_rms_max"] = float(token_rms.min()), float(token_rms.max())
        if numbers["token_rms_min"] < lo or numbers["token_rms_max"] > hi:
            scale.append(f"token RMS in [{numbers['token_rms_min']:.3g}, {numbers['token_rms_max']:.3g}]")
    if scale:
        failures["scale"] = f"{' and '.join(scale)} outside the sane range [{lo:g}, {hi:g}]"

    # 3. variation across prompts and across tokens
    mean_sq = float(v.pow(2).mean())
    numbers["spread"] = float(v.var(0).mean()) / mean_sq if mean_sq > 0 else 0.0
    variation = [] if numbers["spread"] >= SPREAD_MIN else [f"across prompts {numbers['spread']:.3g}"]
    if t is not None:
        spreads = []
        for i in range(n):
            real = t[i][m[i]]  # (tokens, D)
            sq = float(real.pow(2).mean()) if len(real) else 0.0
            if len(real) >= 2:
                spreads.append(float(real.var(0).mean()) / sq if sq > 0 else 0.0)
        numbers["token_spread"] = sum(spreads) / len(spreads) if spreads else 0.0
        if numbers["token_spread"] < SPREAD_MIN:
            variation.append(f"across tokens {numbers['token_spread']:.3g}")
    if variation:
        failures["variation"] = f"relative variance {' and '.join(variation)} below {SPREAD_MIN:g} (degenerate)"

    # 4. distinct prompts give distinct vectors
    norm = float(v.pow(2).sum(-1).mean().sqrt())
    dist = torch.cdist(v, v) / norm if norm > 0 else torch.zeros(n, n, dtype=v.dtype)
    dist = dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    flat = int(dist.argmin())
    i, j = divmod(flat, n)
    numbers["min_distance"] = float(dist[i, j])
    if numbers["min_distance"] < DISTINCT_MIN:
        failures["distinct"] = (
            f"prompts {PROMPTS[i]!r} and {PROMPTS[j]!r} give vectors {numbers['min_distance']:.3g} apart "
            f"(relative), below {DISTINCT_MIN:g}"
        )

    # 5. semantics: paraphrase nearer than an unrelated prompt with the same surface overlap
    k = len(TRIPLETS)
    trip = v[: 3 * k]
    cos = _pairwise_cos(trip - trip.mean(0))
    idx = torch.arange(k) * 3
    margins = cos[idx, idx + 1] - cos[idx, idx + 2]
    mean, std = float(margins.mean()), float(margins.std())
    effect = mean / (std / math.sqrt(k)) if std > 0 else (math.inf if mean > 0 else 0.0)
    numbers.update(margin_mean=mean, margin_std=std, effect_size=effect, positive=int((margins > 0).sum()))
    if effect < EFFECT_MIN or mean < MARGIN_MIN:
        failures["semantics"] = (
            f"paraphrases are not reliably nearer than unrelated prompts: mean margin {mean:.3g} (need >= "
            f"{MARGIN_MIN:g}), effect size t = {effect:.3g} (need >= {EFFECT_MIN:g}), {numbers['positive']}/{k} "
            "triplets positive"
        )
    return numbers, failures


def fingerprint_numbers(vectors: torch.Tensor, numbers: dict[str, float]) -> dict[str, float]:
    """The summary numbers stored in a fingerprint: scale, spread, mean cosine, mean margin and 4 projections.

    The projections (z) are the first anchor's and the empty prompt's vectors projected on fixed random unit
    directions, in units of the RMS: O(1) numbers that move with any change of the features.
    """
    v = vectors.detach().double().cpu()
    cos = _pairwise_cos(v)
    n = len(v)
    mean_cos = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    rms = numbers["rms"] or 1.0
    r = _directions(v.shape[1])
    z = [float(v[0] @ r[0]) / rms, float(v[0] @ r[1]) / rms, float(v[-1] @ r[2]) / rms, float(v[-1] @ r[3]) / rms]
    out = {key: numbers[key] for key in ("rms", "token_rms", "spread") if key in numbers}
    out.update(mean_cos=mean_cos, margin_mean=numbers["margin_mean"])
    out.update({f"z{i}": x for i, x in enumerate(z)})
    return {key: round(val, 7) for key, val in out.items()}


def check_features(
    name: str, vectors: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Checks 1-5 on the given features of PROMPTS (see `measure`); raises CanaryError, returns the numbers."""
    numbers, failures = measure(vectors, tokens, mask)
    if failures:
        raise CanaryError({f"{name}.{check}": why for check, why in failures.items()}, {name: numbers})
    return numbers


def fingerprint_key(provenance: dict[str, Any], fields: Sequence[str]) -> str:
    """The key of an encoder's fingerprint: the named provenance fields, as one string."""

    def text(value: Any) -> str:
        if isinstance(value, dict):
            return ",".join(f"{k}={value[k]}" for k in sorted(value))
        return str(value)

    return "|".join(f"{field}={text(provenance.get(field))}" for field in fields)


def load_fingerprints(path: Path = FINGERPRINTS) -> dict[str, Any]:
    """The stored fingerprints (an empty store when the file does not exist)."""
    if not Path(path).exists():
        return {"fingerprints": {}}
    return json.loads(Path(path).read_text())


def compare(numbers: dict[str, dict[str, float]], reference: dict[str, dict[str, float]], dtype: str) -> list[str]:
    """Differences between fingerprint numbers and a reference beyond the dtype's tolerance, one line each."""
    tol = TOLERANCE.get(dtype, max(TOLERANCE.values()))
    out = []
    for name, ref in reference.items():
        for key, want in ref.items():
            got = numbers.get(name, {}).get(key)
            if got is None:
                out.append(f"{name}.{key} missing (reference {want:.6g})")
                continue
            limit = tol * abs(want) if key in RELATIVE else tol
            if not abs(got - want) <= limit:
                kind = "relative" if key in RELATIVE else "absolute"
                out.append(f"{name}.{key} {got:.6g} vs reference {want:.6g} ({kind} tolerance {tol:g} for {dtype})")
    return out


def run_canary(encoder: Any, record: bool = False, fingerprints: Path = FINGERPRINTS) -> dict[str, Any]:
    """Encode PROMPTS with `encoder`, run checks 1-5 on each of its feature sets and check 6 against the store.

    `encoder` has `canary_features(prompts)` (name -> (vectors, tokens, mask)), `describe()` and
    `fingerprint_fields` (the Kiln text encoders of `src.models.text`). With `record=True` the fingerprint is
    stored (only when checks 1-5 pass) instead of compared. Returns the report; raises CanaryError listing every
    failed check of every feature set.
    """
    provenance = encoder.describe()
    sets = encoder.canary_features(PROMPTS)
    report: dict[str, Any] = {"encoder": provenance, "sets": {}, "fingerprint": None}
    failures: dict[str, str] = {}
    numbers: dict[str, dict[str, float]] = {}
    truncated = False
    for name, (vectors, tokens, mask) in sets.items():
        measured, failed = measure(vectors, tokens, mask)
        report["sets"][name] = measured
        failures.update({f"{name}.{check}": why for check, why in failed.items()})
        if not failed:
            numbers[name] = fingerprint_numbers(vectors, measured)
        if mask is not None and bool((mask.sum(1) >= mask.shape[1]).any()):
            truncated = True  # a probe filled max_length: it may be truncated, features depend on max_length
    fields = tuple(encoder.fingerprint_fields)
    key = fingerprint_key(provenance, fields)
    report["fingerprint_key"] = key
    store = load_fingerprints(fingerprints)
    reference = store["fingerprints"].get(key)
    if failures:
        report["fingerprint"] = "not compared (checks failed)"
    elif truncated and "max_length" not in fields:
        report["fingerprint"] = "skipped: a probe prompt fills max_length (truncated probes change the features)"
    elif record:
        store["fingerprints"][key] = {
            **{field: provenance.get(field) for field in fields},
            "numbers": numbers,
            "recorded_with": {
                "torch": torch.__version__,
                "transformers": _transformers_version(),
                "device": str(_device(encoder)),
                "date": datetime.date.today().isoformat(),
            },
        }
        store["fingerprints"] = dict(sorted(store["fingerprints"].items()))
        Path(fingerprints).write_text(json.dumps(store, indent=2) + "\n")
        report["fingerprint"] = f"recorded in {fingerprints}"
    elif reference is None:
        report["fingerprint"] = "absent: no reference stored for this encoder (python -m src.models.canary --record)"
    else:
        diffs = compare(numbers, reference["numbers"], str(provenance.get("dtype")))
        if diffs:
            failures["fingerprint"] = (
                "probe features differ from the reference recorded with "
                f"{reference.get('recorded_with', {})}: " + "; ".join(diffs)
            )
            report["fingerprint"] = "mismatch"
        else:
            report["fingerprint"] = "match"
    report["numbers"] = numbers
    report["summary"] = _summary(report)
    if failures:
        raise CanaryError(failures, report)
    return report


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _device(encoder: Any) -> torch.device:
    try:
        return next(encoder.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _summary(report: dict[str, Any]) -> str:
    parts = []
    for name, m in report["sets"].items():
        if "effect_size" in m:
            parts.append(f"{name}: t={m['effect_size']:.3g} margin={m['margin_mean']:.3g} spread={m['spread']:.3g}")
        else:
            parts.append(f"{name}: non-finite")
    return "; ".join(parts) + f"; fingerprint {report['fingerprint']}"


def _format(report: dict[str, Any]) -> str:
    lines = [f"encoder: {json.dumps(report['encoder'])}", f"fingerprint key: {report.get('fingerprint_key')}"]
    for name, measured in report["sets"].items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in measured.items())
        lines.append(f"{name}: {shown}")
    lines.append(f"fingerprint: {report['fingerprint']}")
    return "\n".join(lines)


def build_from_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The text encoder of a text config file (`_target_` + arguments), built with its canary off."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    args = OmegaConf.to_container(cfg, resolve=True)
    cls = get_class(args.pop("_target_"))
    args.pop("_partial_", None)
    args["canary"] = False
    return cls(**args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the canary on the encoder of a text config, print the report, optionally record it."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m src.models.canary", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--text", required=True, help="a text encoder config, e.g. conf/text/minilm.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--record", action="store_true", help="store this encoder's fingerprint")
    parser.add_argument("--fingerprints", default=str(FINGERPRINTS), help="the fingerprint store")
    args = parser.parse_args(argv)
    encoder = build_from_config(args.text, args.set)
    try:
        report = run_canary(encoder, record=args.record, fingerprints=Path(args.fingerprints))
    except CanaryError as err:
        if err.report.get("sets"):
            print(_format(err.report))
        print(err, file=sys.stderr)
        return 1
    print(_format(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
