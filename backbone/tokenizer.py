"""Tokenizers for DeepSeek-VL2: the official files from a local folder, or a small byte-level BPE built in code.

Both kinds end up as a transformers `PreTrainedTokenizerFast` behind one wrapper, `Tokenizer`, which is all the
processor uses: `encode` (never adds BOS/EOS itself), `decode`, the ids of the special tokens, `vocab_size`, and
`add_tokens` for tokens other parts of the project add later (e.g. action tokens).

Special tokens (docs/architecture.md, "Chat template, special tokens and grounding"). The official processor adds
the ones a tokenizer lacks, as special tokens:
pad `<｜▁pad▁｜>`, `<image>`, the grounding tags `<|ref|>`, `<|/ref|>`, `<|det|>`, `<|/det|>`, `<|grounding|>`, and the
chat roles `<|User|>`, `<|Assistant|>`. BOS `<｜begin▁of▁sentence｜>` / EOS `<｜end▁of▁sentence｜>` come with the
tokenizer. The built BPE puts BOS, EOS, pad at ids 0, 1, 2 like the real V3-family tokenizer, then the other ten.

Loading pitfall: the official `tokenizer_config.json` names `LlamaTokenizerFast`. In transformers 5 `AutoTokenizer`
maps that to the new `LlamaTokenizer`, which rebuilds a Metaspace pipeline from the vocabulary and does NOT reproduce
the byte-level `tokenizer.json` (spaces vanish). `load_tokenizer` therefore loads the folder with
`PreTrainedTokenizerFast.from_pretrained`, which runs `tokenizer.json` exactly as written.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")
# In id order for the built tokenizer: BOS 0, EOS 1, pad 2, then the processor's additions in the official order.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, *GROUNDING_TOKENS, *ROLE_TOKENS)

# A few paragraphs for the built tokenizer when no corpus is given: chat, captions, grounding, robot instructions.
BUILTIN_CORPUS = """\
The robot arm moves to the red cube, grasps it and places it on the blue plate next to the bowl.
Pick up the green block and put it in the drawer. Push the T-shaped object to the target region.
Open the top drawer, then close it again. Stack the yellow cup on top of the white cup.
Describe the image in detail. What is in this picture? How many people are standing near the car?
The image shows a kitchen with a wooden table, two chairs, a window and a plant on the counter.
A giraffe at the back is eating leaves from a tall tree while a zebra walks across the grass.
Locate the object in the given image. Where is the cat? The cat is sitting on the sofa to the left of the lamp.
Read the text on the sign. The sign says: "Stop! Do not enter. Authorized personnel only."
Question: what color is the bus? Answer: the bus is red and white, parked by the side of the road.
The chart shows the number of sales per month: January 120, February 95, March 143, April 160.
Please answer the question with a single word or phrase. Yes. No. Two. Left. Right. Up. Down.
The gripper is open; the camera looks at the scene from above and sees three objects on the table.
In the first frame the arm is at rest; in the second frame it reaches toward the handle of the door.
User: can you help me find my keys? Assistant: sure, they are on the shelf beside the door.
Numbers and coordinates: 0 1 2 3 4 5 6 7 8 9 10 42 100 250 384 512 768 999 [[580, 270, 999, 900]].
"""


class Tokenizer:
    """One interface over a transformers fast tokenizer, with every DeepSeek-VL2 special token present.

    `hf` is the underlying `PreTrainedTokenizerFast`; use it for anything not wrapped here.
    """

    def __init__(self, hf: PreTrainedTokenizerFast):
        self.hf = hf
        self.hf.padding_side = "left"
        _ensure_special_tokens(hf)
        self.bos_id: int = self.token_id(BOS_TOKEN if hf.bos_token is None else hf.bos_token)
        self.eos_id: int = self.token_id(EOS_TOKEN if hf.eos_token is None else hf.eos_token)
        self.pad_id: int = self.token_id(hf.pad_token)
        self.image_id: int = self.token_id(IMAGE_TOKEN)

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`) from a local folder; see the module docstring."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        return cls(PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (loadable by `from_pretrained` and by transformers)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(path))

    # ----------------------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never adds BOS/EOS (the processor places those itself)."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens are kept by default: grounding tags are special tokens too."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of one token that must be a single vocabulary entry (KeyError otherwise)."""
        token_id = self.hf.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.hf.unk_token_id and token != self.hf.unk_token:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return int(token_id)

    @property
    def special_ids(self) -> dict[str, int]:
        """Every DeepSeek-VL2 special token -> its id."""
        tokens = (self.hf.bos_token, self.hf.eos_token, self.hf.pad_token, IMAGE_TOKEN, *GROUNDING_TOKENS, *ROLE_TOKENS)
        return {tok: self.token_id(tok) for tok in tokens}

    @property
    def vocab_size(self) -> int:
        """Number of ids in use, added tokens included (the embedding table needs at least this many rows)."""
        return len(self.hf)

    def add_tokens(self, tokens: Iterable[str], special: bool = True) -> list[int]:
        """Add `tokens` (those already present keep their id); returns the ids of all of them, in order.

        Special tokens are split out of text whole and are never merged with neighbouring text.
        """
        tokens = list(tokens)
        missing = [t for t in tokens if t not in self.hf.get_vocab()]
        if missing:
            new = [AddedToken(t, special=special, normalized=False, single_word=False) for t in missing]
            self.hf.add_tokens(new, special_tokens=special)
        return [self.token_id(t) for t in tokens]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, image={self.image_id})"


def _ensure_special_tokens(hf: PreTrainedTokenizerFast) -> None:
    """Add what the official processor adds when missing: pad, `<image>`, grounding tags, chat roles."""
    vocab = hf.get_vocab()
    if hf.bos_token is None and BOS_TOKEN in vocab:
        hf.bos_token = BOS_TOKEN
    if hf.eos_token is None and EOS_TOKEN in vocab:
        hf.eos_token = EOS_TOKEN
    if hf.bos_token is None or hf.eos_token is None:
        raise ValueError("tokenizer has no BOS/EOS token; DeepSeek-VL2 needs both")
    if hf.pad_token is None:
        if PAD_TOKEN not in vocab:
            hf.add_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)], special_tokens=True)
        hf.pad_token = PAD_TOKEN
    missing = [t for t in (IMAGE_TOKEN, *GROUNDING_TOKENS, *ROLE_TOKENS) if t not in vocab]
    if missing:
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The official (or a saved built) tokenizer from a folder holding `tokenizer.json` (or a hub id in the local
    cache: `backbone.checkpoint.checkpoint_folder`)."""
    from backbone.checkpoint import checkpoint_folder

    return Tokenizer.from_pretrained(checkpoint_folder(path))


def build_bpe_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> Tokenizer:
    """Train a small byte-level BPE with all DeepSeek-VL2 special tokens (BOS 0, EOS 1, pad 2, `<image>` 3, ...).

    Numbers are split into single digits. Deterministic: the same corpus and vocab size give the same vocabulary
    and merges. `vocab_size` is an upper bound; a tiny corpus yields fewer merges. The 256 byte symbols are always
    present, so any text encodes.
    """
    texts = list(corpus) if corpus is not None else BUILTIN_CORPUS.splitlines()
    raw = RawTokenizer(models.BPE())
    # numbers split into single digits, as DeepSeek LLM's tokenizer does: a box coordinate "531" is the digits 5 3 1,
    # so the model learns ten digit tokens per place instead of one token per number
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left"
    )
    return Tokenizer(hf)
