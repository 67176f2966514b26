"""Text encoders: T5+CLIP from local directories, strict loading, and the canary that refuses worthless features.

Tiny random T5 and CLIP directories are built in tmp_path with locally made word-level tokenizers (no download);
random weights must fail the canary, so the loading path is tested with `canary=False`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from src.models import canary
from src.models.canary import PROMPTS, TRIPLETS, CanaryError, check_features, run_canary
from src.models.text import HFTextEncoder, T5CLIPTextEncoder
from tests.conftest import ROOT

MAX_LEN = 16
WORDS = sorted({w for p in PROMPTS for w in p.split()} | {"red", "square", "moves", "left"})


def save_tokenizer(directory: Path, specials: list[str], template: str, **named: str) -> int:
    """A lowercase word-level tokenizer over WORDS, saved so that AutoTokenizer loads it; returns its vocab size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [(s, vocab[s]) for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **named).save_pretrained(directory)
    return len(vocab)


def make_t5(directory: Path, seed: int = 0) -> Path:
    """A tiny random T5 encoder-decoder checkpoint, holding `decoder.*` and an untied `lm_head.weight` like v1.1."""
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = save_tokenizer(directory, ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>")
    config = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    state["lm_head.weight"] = torch.randn(vocab, 32)
    save_file(state, directory / "model.safetensors")
    return directory


def make_clip(directory: Path, seed: int = 0) -> Path:
    """A tiny random full CLIP checkpoint (text and vision towers); the text tower's end token is `</s>`."""
    from transformers import CLIPConfig, CLIPModel

    specials = ["<pad>", "<s>", "<unk>", "</s>"]
    vocab = save_tokenizer(directory, specials, "<s> $A </s>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    text = dict(
        vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=3,
    )  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_text")
    return make_t5(root / "t5"), make_clip(root / "clip")


def t5_clip(dirs: tuple[Path, Path], **kwargs) -> T5CLIPTextEncoder:
    args = dict(max_length=MAX_LEN, dtype="float32", canary=False) | kwargs
    return T5CLIPTextEncoder(str(dirs[0]), str(dirs[1]), **args)


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    return HFTextEncoder(max_length=16, canary=False)


# ---------------------------------------------------------------------------------------------- T5 + CLIP


@pytest.mark.numerics
def test_t5_clip_shapes_mask_conventions_and_provenance(tiny_dirs):
    captions = ["a dog is running on the beach", "a cat"]
    attend = t5_clip(tiny_dirs, mask_convention="attend_padding")
    masked = t5_clip(tiny_dirs, mask_convention="mask_padding")
    (ta, pa), (tm, pm) = attend(captions), masked(captions)
    assert ta.shape == tm.shape == (2, MAX_LEN, 32) and pa.shape == pm.shape == (2, 24)
    assert ta.dtype == pa.dtype == torch.float32
    assert (attend.dim, attend.pooled_dim) == (32, 24)
    mask = attend.token_mask(captions)
    assert mask.sum(1).tolist() == [8, 3]  # words + </s>, then padding
    # attend_padding keeps features at the padding; mask_padding zeroes them
    assert ta[~mask].abs().sum(-1).min() > 0 and tm[~mask].abs().max() == 0
    # real tokens attend to the padding only under attend_padding, so their features differ
    assert not torch.allclose(ta[mask], tm[mask], atol=1e-4)
    # CLIP's pooled vector is taken at the end token, before any padding, under causal attention: the same
    assert torch.allclose(pa, pm, atol=1e-5)
    for enc, convention in ((attend, "attend_padding"), (masked, "mask_padding")):
        args = dict(max_length=MAX_LEN, dtype="float32", mask_convention=convention)
        assert T5CLIPTextEncoder.provenance(str(tiny_dirs[0]), str(tiny_dirs[1]), **args) == enc.describe()
        assert enc.describe()["mask_convention"] == convention
        assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    prov = attend.describe()
    assert (prov["dim"], prov["pooled_dim"], prov["max_length"]) == (32, 24, MAX_LEN)
    assert set(prov["weights_sha256"]) == {"t5", "clip"}


def test_t5_clip_in_bfloat16(tiny_dirs):
    enc = t5_clip(tiny_dirs, dtype="bfloat16")
    assert next(enc.t5.parameters()).dtype == torch.bfloat16
    tokens, pooled = enc(["a red square moves left"])
    assert tokens.dtype == pooled.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert enc.t5.shared.weight is enc.t5.encoder.embed_tokens.weight  # tied again after loading on meta


def test_null_paths_and_bad_settings_are_refused(tiny_dirs):
    with pytest.raises(InstantiationException, match="ValueError.*t5_path is not set.*t5-v1_1-xxl"):
        instantiate(OmegaConf.load(ROOT / "conf/text/t5_clip.yaml"))  # Hydra wraps the ValueError
    with pytest.raises(ValueError, match="clip_path is not set.*clip-vit-large-patch14"):
        T5CLIPTextEncoder(t5_path=str(tiny_dirs[0]), clip_path=None)
    with pytest.raises(ValueError, match="does not exist"):
        t5_clip((tiny_dirs[0] / "nope", tiny_dirs[1]))
    with pytest.raises(ValueError, match="mask_convention"):
        t5_clip(tiny_dirs, mask_convention="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        t5_clip(tiny_dirs, dtype="float64")


def test_t5_clip_config_file_matches_the_class():
    cfg = OmegaConf.load(ROOT / "conf/text/t5_clip.yaml")
    assert cfg._target_ == "src.models.text.T5CLIPTextEncoder"
    assert (cfg.max_length, cfg.dtype, cfg.mask_convention, cfg.canary) == (512, "bfloat16", "attend_padding", True)
    assert list(cfg.ignore_unexpected) == ["decoder.", "lm_head."]


# ---------------------------------------------------------------------------------------------- strict loading


def edited_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors")
    return target


Q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(Q0), rf"1 missing: {Q0}"),
        (lambda s: s.update({"encoder.block.0.extra.weight": torch.zeros(2)}), r"1 unexpected: encoder.block.0.extra"),
        (
            lambda s: s.update({Q0: torch.zeros(32, 16)}),
            rf"1 mis-shaped: {Q0} \(checkpoint \[32, 16\], model \[32, 32\]",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_t5_loading_is_strict(tiny_dirs, tmp_path, edit, message):
    t5 = edited_copy(tiny_dirs[0], tmp_path / "t5", edit)
    with pytest.raises(ValueError, match=message):
        t5_clip((t5, tiny_dirs[1]))


def test_clip_loading_is_strict(tiny_dirs, tmp_path):
    clip = edited_copy(tiny_dirs[1], tmp_path / "clip", lambda s: s.pop("text_model.final_layer_norm.bias"))
    with pytest.raises(ValueError, match="CLIP text model .* 1 missing: final_layer_norm.bias"):
        t5_clip((tiny_dirs[0], clip))


def test_dropping_the_decoder_is_explicit(tiny_dirs):
    """Without the `ignore_unexpected` default, the decoder of a full T5 checkpoint is an error, not a silent drop."""
    with pytest.raises(ValueError, match=r"unexpected: decoder\.block\.0.*lm_head\.weight"):
        t5_clip(tiny_dirs, ignore_unexpected=[])
    with pytest.raises(ValueError, match=r"unexpected: logit_scale, text_projection\.weight, vision_model"):
        t5_clip(tiny_dirs, clip_ignore_unexpected=[])


def make_bert(directory: Path, pooler: bool, position_ids: torch.Tensor | None = None) -> Path:
    """A tiny random BERT directory, with or without pooler weights and an old-style `embeddings.position_ids`."""
    from transformers import BertConfig, BertModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = save_tokenizer(directory, specials, "[CLS] $A [SEP]", pad_token="[PAD]")
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40)  # fmt: skip
    BertModel(config, add_pooling_layer=pooler).save_pretrained(directory)
    if position_ids is not None:
        state = load_file(directory / "model.safetensors")
        state["embeddings.position_ids"] = position_ids
        save_file(state, directory / "model.safetensors")
    return directory


def test_hf_encoder_builds_the_model_the_checkpoint_holds(tmp_path):
    """MiniLM-style checkpoints: pooler weights or not, and a stored position_ids that must equal 0, 1, 2, ..."""
    ok = make_bert(tmp_path / "pooler", pooler=True, position_ids=torch.arange(40)[None])
    enc = HFTextEncoder(str(ok), max_length=8, canary=False)
    assert enc.encoder.pooler is not None
    assert enc(["a red square"])[0].shape == (1, 8, 16)
    assert HFTextEncoder(str(make_bert(tmp_path / "bare", pooler=False)), canary=False).encoder.pooler is None
    bad = make_bert(tmp_path / "bad", pooler=True, position_ids=torch.arange(40)[None].flip(-1))
    with pytest.raises(ValueError, match="embeddings.position_ids .*differs"):
        HFTextEncoder(str(bad), canary=False)


def test_real_minilm_loads_strictly(minilm):
    assert minilm.encoder.pooler is not None  # all-MiniLM-L6-v2 holds pooler.dense.*: loaded (and unused)
    assert minilm.describe() == HFTextEncoder.provenance(max_length=16)
    assert minilm.describe()["model_type"] == "bert" and minilm.describe()["dim"] == 384


def test_the_caption_memo_encodes_each_caption_once_and_returns_what_encoding_returns(minilm, monkeypatch):
    """`memo_captions` keeps the features of the most recently used captions: a repeated caption is not encoded
    again, and every batch gets the features that encoding it now gives (bitwise: rows do not depend on the batch)."""
    memo = HFTextEncoder(max_length=16, canary=False, memo_captions=3)
    assert memo.describe() == minilm.describe()  # the memo does not change what features are
    encoded: list[str] = []
    encode = memo.encode
    monkeypatch.setattr(memo, "encode", lambda captions: (encoded.extend(captions), encode(captions))[1])
    batches = [["a red square", "a cat", "a red square"], ["a cat", "a dog"], ["a bird", "a red square"], ["a cat"]]
    for batch in batches:
        tokens, pooled = memo(batch)
        want_tokens, want_pooled = minilm(batch)
        assert tokens.shape == (len(batch), 16, 384) and torch.equal(tokens, want_tokens)
        assert torch.equal(pooled, want_pooled)
    # a cat was used least recently when a bird came (a red square, a dog, a bird remain), so it is encoded again
    assert encoded == ["a red square", "a cat", "a dog", "a bird", "a cat"]
    assert list(memo._memo) == ["a bird", "a red square", "a cat"]
    with pytest.raises(ValueError, match="memo_captions must be >= 0.*got -1"):
        HFTextEncoder(max_length=16, canary=False, memo_captions=-1)


# ---------------------------------------------------------------------------------------------- the canary


def test_probe_triplets_give_surface_form_no_advantage(minilm):
    """The paraphrase shares no content word; the unrelated prompt shares as many words and WordPiece tokens."""

    def overlap(x: list[str], y: list[str]) -> int:
        return sum(min(x.count(t), y.count(t)) for t in set(x))

    function_words = {"a", "an", "the", "is", "are", "two", "together"}
    function_words |= {"on", "in", "at", "over", "across", "against", "with"}
    assert len(TRIPLETS) == 24 and len(set(PROMPTS)) == len(PROMPTS)
    for anchor, para, unrelated in TRIPLETS:
        a, p, u = anchor.split(), para.split(), unrelated.split()
        assert set(a) & set(p) <= function_words, (anchor, para)
        assert len(p) == len(u) and overlap(a, u) >= overlap(a, p), (anchor, para, unrelated)
        ta, tp, tu = (minilm.tokenizer.tokenize(x) for x in (anchor, para, unrelated))
        assert overlap(ta, tu) >= overlap(ta, tp) and len(tu) <= len(tp), (anchor, para, unrelated)


def test_random_t5_and_clip_fail_the_canary(tiny_dirs):
    with pytest.raises(CanaryError) as err:
        t5_clip(tiny_dirs, canary=True)
    assert {"t5.semantics", "clip.semantics"} <= set(err.value.failures)
    assert "effect size" in str(err.value)


def test_reinitialised_minilm_fails_the_canary(minilm):
    from transformers import BertModel

    broken = HFTextEncoder(max_length=16, canary=False)
    torch.manual_seed(0)
    broken.encoder = BertModel(minilm.encoder.config).eval()  # the same architecture and tokenizer, random weights
    with pytest.raises(CanaryError) as err:
        run_canary(broken)
    assert "text.semantics" in err.value.failures


def test_degenerate_features_fail():
    n = len(PROMPTS)
    with pytest.raises(CanaryError) as err:
        check_features("zeros", torch.zeros(n, 8), torch.zeros(n, 4, 8), torch.ones(n, 4, dtype=torch.bool))
    assert {"zeros.scale", "zeros.variation", "zeros.distinct", "zeros.semantics"} <= set(err.value.failures)
    constant = torch.ones(n, 8)
    with pytest.raises(CanaryError, match="constant.variation"):
        check_features("constant", constant)
    nan = torch.randn(n, 8)
    nan[3, 2] = float("nan")
    with pytest.raises(CanaryError, match=r"nan.finite: 1 NaN/inf"):
        check_features("nan", nan)


def test_real_minilm_passes_and_matches_its_fingerprint(minilm):
    report = run_canary(minilm)
    assert report["fingerprint"] == "match"
    text = report["sets"]["text"]
    assert text["effect_size"] > 10 and text["margin_mean"] > 0.3 and text["positive"] == len(TRIPLETS)


def test_a_perturbed_fingerprint_fails(minilm, tmp_path):
    store = json.loads(canary.FINGERPRINTS.read_text())
    key = canary.fingerprint_key(minilm.describe(), minilm.fingerprint_fields)
    store["fingerprints"][key]["numbers"]["text"]["z0"] += 0.1
    path = tmp_path / "fingerprints.json"
    path.write_text(json.dumps(store))
    with pytest.raises(CanaryError, match=r"fingerprint.*text\.z0 .* vs reference"):
        run_canary(minilm, fingerprints=path)


def test_the_command_line_records_a_fingerprint(tmp_path, capsys):
    path = tmp_path / "fingerprints.json"
    args = ["--text", str(ROOT / "conf/text/minilm.yaml"), "--set", "max_length=16", "--fingerprints", str(path)]
    assert canary.main([*args, "--record"]) == 0
    assert "recorded in" in capsys.readouterr().out
    assert canary.main(args) == 0
    assert "fingerprint: match" in capsys.readouterr().out
    recorded = json.loads(path.read_text())["fingerprints"]
    committed = json.loads(canary.FINGERPRINTS.read_text())["fingerprints"]
    assert recorded.keys() == committed.keys()
