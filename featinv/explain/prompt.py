"""Prompts with slots, fed to a prior's text encoder as differentiable token embeddings.

DEXTER (Carnemolla et al., arXiv 2510.14741, text pipeline) fills the masked slots of a template
sentence ("A picture of a [MASK] with [MASK] and ...") with hard Gumbel-softmax one-hots over the
masked LM's vocabulary, maps them to the CLIP vocabulary with a one-hot *translation matrix* (words
common to both vocabularies), multiplies by CLIP's token-embedding matrix and runs CLIP's text
encoder on the resulting sequence; DiffExplainer (arXiv 2404.02618) optimises token embeddings
directly. Both need what this module gives:

* ``Template``: a sentence with ``{}`` slots, e.g. ``"a {} {} {} at the {} {} on a {} background"``,
  plus word-sequence ``rewrites`` that turn the template's canonical form into the surface form the
  text encoder was trained on (in the shapes world "at the middle center" -> "in the center",
  "on a blue background" -> "on a dark blue background"). A rewrite keeps a slot's binding for every
  word it keeps; words it inserts are constants.
* ``SlotTextEncoder``: conditioning (1, L, D) from slot one-hots (``encode_onehot``: one-hot x
  translation x token embeddings, exactly the tokenizer's path for hard one-hots) or from free slot
  embeddings (``encode_embeddings``: soft tokens). The sequence is laid out as the tokenizer lays out
  a prompt (BOS, tokens, EOS, padding to ``model_max_length``) and run through the text encoder's own
  forward, the token-embedding output replaced by a forward hook; gradients reach the one-hots /
  soft tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Template", "SlotTextEncoder", "translation_matrix", "encode_with_embeddings"]


@dataclass
class Template:
    """A sentence with ``{}`` slots and surface ``rewrites`` (pairs of space-separated word sequences);
    ``slot_vocab`` (optional): the words each slot may take, when the grammar types its slots (DEXTER's
    ``typed_slots``)."""

    text: str
    rewrites: list[tuple[str, str]] = field(default_factory=list)
    slot_vocab: list[list[str]] | None = None

    def __post_init__(self):
        self.rewrites = [(str(a), str(b)) for a, b in self.rewrites]
        self.parts = self.text.split()
        self.n_slots = sum(p == "{}" for p in self.parts)
        if self.n_slots == 0:
            raise ValueError(f"template {self.text!r} has no '{{}}' slot")
        if self.slot_vocab is not None:
            if isinstance(self.slot_vocab, str) or any(isinstance(v, str) for v in self.slot_vocab):
                raise ValueError(f"slot_vocab needs one word *list* per slot, got {self.slot_vocab!r}")
            self.slot_vocab = [[str(w) for w in v] for v in self.slot_vocab]
            if len(self.slot_vocab) != self.n_slots or not all(self.slot_vocab):
                raise ValueError(f"slot_vocab needs one non-empty word list per slot ({self.n_slots}), "
                                 f"got {self.slot_vocab}")

    def items(self, words: list[str] | None = None) -> list[tuple[str, int | None]]:
        """The canonical sequence as (word, slot index or None); ``words`` fill the slots (default "{}")."""
        if words is not None and len(words) != self.n_slots:
            raise ValueError(f"template has {self.n_slots} slots, got {len(words)} words")
        out, k = [], 0
        for p in self.parts:
            if p == "{}":
                out.append((words[k] if words is not None else "{}", k))
                k += 1
            else:
                out.append((p, None))
        return out

    def fill(self, words: list[str]) -> str:
        """The canonical sentence (no rewrites): what the masked LM reads."""
        return " ".join(w for w, _ in self.items(words))

    def realise(self, words: list[str]) -> list[tuple[str, int | None]]:
        """The surface sequence (rewrites applied left to right, repeatedly) with slot bindings."""
        seq = self.items(words)
        for src, dst in self.rewrites:
            a, b = src.split(), dst.split()
            i = 0
            while i + len(a) <= len(seq):
                if [w for w, _ in seq[i:i + len(a)]] == a:
                    slot_of = {w: s for w, s in seq[i:i + len(a)] if s is not None}
                    seq[i:i + len(a)] = [(w, slot_of.pop(w, None)) for w in b]
                    i += len(b)
                else:
                    i += 1
        return seq

    def surface(self, words: list[str]) -> str:
        """The prompt string the text encoder reads for ``words``."""
        return " ".join(w for w, _ in self.realise(words))

    def canonical(self, caption: str) -> str:
        """Inverse rewrites (surface -> canonical), e.g. to train the masked LM on the prior's captions."""
        words = caption.split()
        for src, dst in self.rewrites:
            a, b = dst.split(), src.split()
            i = 0
            while i + len(a) <= len(words):
                if words[i:i + len(a)] == a:
                    words[i:i + len(a)] = b
                    i += len(b)
                else:
                    i += 1
        return " ".join(words)

    def slot_words(self, sentence: str) -> list[str] | None:
        """The slot fillers of a canonical sentence, or None if it does not follow the template."""
        words = sentence.split()
        if len(words) != len(self.parts):
            return None
        out = []
        for w, p in zip(words, self.parts):
            if p == "{}":
                out.append(w)
            elif w != p:
                return None
        return out


def translation_matrix(words: list[str], tokenizer) -> torch.Tensor:
    """(len(words), vocab) one-hot map from a word list to the tokenizer's single-token ids (DEXTER's
    translation matrix between the masked LM's and CLIP's vocabularies). Every word must be one token."""
    T = torch.zeros(len(words), len(tokenizer))
    for i, w in enumerate(words):
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"word {w!r} is not a single token of the text encoder's tokenizer ({ids})")
        T[i, ids[0]] = 1.0
    return T


def encode_with_embeddings(text_encoder: nn.Module, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, L, D) of ``text_encoder`` run on ``ids`` (B, L) with its token-embedding
    output replaced by ``embeds`` (B, L, D) (a forward hook: the encoder's own positions, causal mask
    and final norm apply). Gradients flow to ``embeds``."""
    layer = text_encoder.get_input_embeddings()
    handle = layer.register_forward_hook(lambda m, i, o: embeds.to(o.dtype))
    try:
        return text_encoder(ids.to(embeds.device))[0]
    finally:
        handle.remove()


class SlotTextEncoder(nn.Module):
    """Conditioning from slot choices for a prior's ``text_encoder`` + ``tokenizer`` (module docstring).

    ``words``: the candidate slot words (the masked LM's content vocabulary, in its order); their
    translation to the tokenizer (``translation_matrix``) is a buffer.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, template: Template, words: list[str],
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.text_encoder, self.tokenizer, self.template = text_encoder, tokenizer, template
        self.words = list(words)
        self.max_length = int(tokenizer.model_max_length)
        self.out_dtype = dtype
        self.register_buffer("T", translation_matrix(self.words, tokenizer), persistent=False)

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    def _ids(self, tokens: list[str]) -> list[int]:
        out = []
        for w in tokens:
            ids = self.tokenizer(w, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"template word {w!r} is not a single token")
            out.append(ids[0])
        return out

    def _layout(self, seq: list[tuple[str, int | None]]) -> tuple[torch.Tensor, list[int | None]]:
        """Token ids (1, max_length) laid out as the tokenizer does, and each position's slot."""
        tok = self.tokenizer
        ids = [tok.pad_token_id if (w == "{}" and s is not None) else self._ids([w])[0] for w, s in seq]
        slots = [s for _, s in seq]
        n = self.max_length - 2
        ids, slots = ids[:n], slots[:n]
        full = [tok.bos_token_id] + ids + [tok.eos_token_id]
        full += [tok.pad_token_id] * (self.max_length - len(full))
        return torch.tensor([full]), [None] + slots + [None] * (self.max_length - 1 - len(slots))

    def _run(self, ids: torch.Tensor, slots: list[int | None], rows: torch.Tensor) -> torch.Tensor:
        E = self.token_embedding
        emb = E[ids.to(E.device)[0]]  # (L, D) constants
        pos = [i for i, s in enumerate(slots) if s is not None]
        if pos:
            idx = torch.tensor(pos, device=E.device)
            src = rows[torch.tensor([slots[i] for i in pos], device=E.device)].to(emb.dtype)
            emb = emb.index_put((idx,), src)
        out = encode_with_embeddings(self.text_encoder, ids, emb[None])
        return out.to(self.out_dtype) if self.out_dtype is not None else out

    def encode_onehot(self, onehot: torch.Tensor) -> torch.Tensor:
        """(n_slots, len(words)) one-hots (hard Gumbel-softmax, straight-through) -> conditioning (1, L, D).
        The realised sentence follows each slot's argmax word; slot rows = one-hot x T x E."""
        words = [self.words[j] for j in onehot.argmax(dim=1).tolist()]
        ids, slots = self._layout(self.template.realise(words))
        rows = onehot.to(self.T.dtype) @ self.T @ self.token_embedding.to(self.T.dtype)
        return self._run(ids, slots, rows)

    def encode_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """(n_slots, D) free token embeddings (soft tokens) in the template's canonical slots -> (1, L, D)."""
        if rows.shape[0] != self.template.n_slots:
            raise ValueError(f"{self.template.n_slots} slots, got {rows.shape[0]} soft tokens")
        ids, slots = self._layout(self.template.items())
        return self._run(ids, slots, rows)

    def encode_words(self, words: list[str]) -> torch.Tensor:
        """Conditioning of hard words through the one-hot path (equals encoding ``template.surface``)."""
        onehot = torch.zeros(len(words), len(self.words), device=self.T.device)
        for i, w in enumerate(words):
            onehot[i, self.words.index(w)] = 1.0
        return self.encode_onehot(onehot)

    @torch.no_grad()
    def nearest_words(self, rows: torch.Tensor) -> list[str]:
        """The candidate word whose token embedding is nearest (cosine) to each soft token."""
        W = self.T @ self.token_embedding.to(self.T.dtype)  # (V_words, D)
        sim = torch.nn.functional.normalize(rows.to(W.dtype), dim=1) @ torch.nn.functional.normalize(W, dim=1).T
        return [self.words[j] for j in sim.argmax(dim=1).tolist()]
