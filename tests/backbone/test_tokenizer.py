"""Tokenizers: the built byte-level BPE, save/load through transformers, special tokens, added tokens."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from backbone.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    build_bpe_tokenizer,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_bpe_tokenizer()


def test_special_token_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (0, 1, 2, 3)
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 512


def test_round_trip_and_specials_split_out(tok):
    text = "<|User|>: Locate <|ref|>the red cube<|/ref|> in <image>.\n\n<|Assistant|>: é ✓ 漢字"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for special in ("<|User|>", "<|ref|>", "<|/ref|>", IMAGE_TOKEN, "<|Assistant|>"):
        assert ids.count(tok.token_id(special)) == 1
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode never adds BOS/EOS
    assert tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=True).startswith(": Locate")


def test_numbers_are_split_into_digits():
    tok = build_bpe_tokenizer(["boxes [[531,484,640,593]] and [[531,484,640,593]] again 531 531 531"], vocab_size=300)
    text = "<|det|>[[531,484,640,593]]<|/det|> 1024 apples"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("5314846405931024")  # one token per digit, however often a number was seen


def test_build_is_deterministic():
    corpus = ["pick up the cube", "put the cube in the bowl", "the robot sees the bowl"]
    a, b = build_bpe_tokenizer(corpus, vocab_size=300), build_bpe_tokenizer(corpus, vocab_size=300)
    assert a.hf.get_vocab() == b.hf.get_vocab()
    assert a.hf.backend_tokenizer.to_str() == b.hf.backend_tokenizer.to_str()


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    again = load_tokenizer(tmp_path)
    text = "Describe <image> the scene: 3 cups, 42 blocks.\n\n<|det|>[[1, 2, 3, 4]]<|/det|>"
    assert again.encode(text) == tok.encode(text)
    assert again.special_ids == tok.special_ids
    assert again.vocab_size == tok.vocab_size
    # plain transformers sees the same thing
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def test_missing_special_tokens_are_added(tmp_path):
    """A tokenizer folder with only BOS/EOS gains pad, <image>, grounding and role tokens, like the official one."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Raw

    raw = Raw(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(["hello world"], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN).save_pretrained(tmp_path)
    assert "pad_token" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert set(tok.special_ids) == set(SPECIAL_TOKENS)
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
    assert tok.encode("<|grounding|>hello")[0] == tok.token_id("<|grounding|>")


def test_add_tokens(tmp_path):
    tok = build_bpe_tokenizer()
    ids = tok.add_tokens(["<act_0>", "<act_1>", IMAGE_TOKEN])
    assert ids == [512, 513, tok.image_id]
    assert tok.add_tokens(["<act_1>"]) == [513]  # idempotent
    assert tok.vocab_size == 514
    assert tok.encode("go<act_1><act_0>")[-2:] == [513, 512]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("go<act_1><act_0>") == tok.encode("go<act_1><act_0>")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(KeyError):
        build_bpe_tokenizer().token_id("<not a token>")


def test_official_style_config_naming_llama_class(tok, tmp_path):
    """The official tokenizer_config.json names LlamaTokenizerFast; transformers 5's AutoTokenizer would rebuild it
    as a Metaspace tokenizer and lose the spaces. load_tokenizer must run tokenizer.json as written."""
    tok.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    config_path.write_text(json.dumps(config))
    text = "<|User|>: pick up the red cube\n\n<|Assistant|>:"
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)
    assert tok.decode(load_tokenizer(tmp_path).encode(text)) == text
