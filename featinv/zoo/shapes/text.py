"""The shapes world's tokenizer: a ``CLIPTokenizer`` whose BPE is trained on the caption grammar.

The BPE vocabulary and merges come from ``tokenizers``' ``BpeTrainer`` run on every caption of both
modes, with CLIP's own normaliser, pre-tokeniser (CLIP regex + byte level) and ``</w>`` end-of-word
suffix; merges are learnt until no pair is left, so every grammar word is one token (hand-written
merge lists mis-split words). Unknown words still encode through the byte alphabet.
``BpeTrainer`` numbers some tokens in a random hash order; ``canonical_vocab`` renumbers them, so every
build since 2026-11-25 is identical. Folders saved before have hash-ordered ids: always load a folder's
own tokenizer (the one its text encoder was trained with), never a rebuild.
The result loads with ``CLIPTokenizer.from_pretrained`` like Stable Diffusion's tokenizer; the
pad token is ``<|endoftext|>`` as in SD and the context length is ``MAX_LENGTH``.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np

from featinv.zoo.shapes import world as W

MAX_LENGTH = 20  # longest caption: 13 words + BOS + EOS = 15 tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def all_single_rows() -> np.ndarray:
    """One row per combination of the captioned factors (2,592), nuisances zero."""
    combos = list(itertools.product(*(range(len(v)) for v in W.FACTORS.values())))
    rows = np.zeros(len(combos), W.SINGLE_DTYPE)
    for k, name in enumerate(W.FACTORS):
        rows[name] = [c[k] for c in combos]
    return rows


def all_multi_rows() -> np.ndarray:
    """One row per concept subset of size <= MULTI_MAX (42)."""
    subsets = [s for n in range(W.MULTI_MAX + 1) for s in itertools.combinations(range(6), n)]
    rows = np.zeros(len(subsets), W.MULTI_DTYPE)
    for i, s in enumerate(subsets):
        rows["present"][i, list(s)] = True
    return rows


def caption_corpus() -> list[str]:
    """Every caption the grammar produces (both modes; single mode also with factors left out)."""
    single = all_single_rows()
    partial = [c for n in range(len(W.FACTORS)) for keep in itertools.combinations(W.FACTORS, n)
               for c in W.captions(single[::7], keep)]  # a spread subset covers every word of each form
    return W.captions(single) + partial + W.captions(all_multi_rows())


def grammar_words() -> list[str]:
    """Every pre-token (word, digit, punctuation) of the grammar, as CLIP's regex splits them."""
    pat = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")
    return sorted({w for c in caption_corpus() for w in pat.findall(c.lower())})


def build_tokenizer(max_length: int = MAX_LENGTH):
    """Train the BPE on the caption corpus and wrap it as a ``transformers.CLIPTokenizer``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    bpe.train_from_iterator(caption_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=canonical_vocab(model["vocab"], merges), merges=merges, model_max_length=max_length)
    return tok


def canonical_vocab(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, int]:
    """Ids independent of the trainer's hash order: the special tokens, then every other non-merged token
    sorted, then the merge results in merge order. ``BpeTrainer`` numbers the single-character word-end
    tokens ("e</w>", "1</w>", ...) in the order of a Rust hash map with a random state, so without this a
    rebuild -- and a text encoder trained on it -- differs from run to run (the merges do not)."""
    made = list(dict.fromkeys(a + b for a, b in merges))
    specials = [t for t in (BOS, EOS) if t in vocab]
    rest = sorted(set(vocab) - set(made) - set(specials))
    order = specials + rest + [t for t in made if t not in specials]
    if sorted(order) != sorted(vocab):
        raise RuntimeError("canonical_vocab lost or duplicated a token")
    return {t: i for i, t in enumerate(order)}


def save_tokenizer(folder: str | Path) -> Path:
    """Build the tokenizer and ``save_pretrained`` it into ``folder``; checks the one-token property."""
    tok = build_tokenizer()
    bad = split_words(tok)
    if bad:
        raise RuntimeError(f"grammar words not single tokens: {bad}")
    tok.save_pretrained(str(folder))
    return Path(folder)


def split_words(tok) -> dict[str, list[str]]:
    """Grammar words that the tokenizer does not encode as exactly one token (empty = good)."""
    out = {}
    for w in grammar_words():
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            out[w] = tok.convert_ids_to_tokens(ids)
    return out
