"""A small word-level masked language model with a soft prompt: DEXTER's text generator, scaled down.

DEXTER (Carnemolla et al., arXiv 2510.14741, text pipeline) prepends a learnable soft prompt
p in R^{P x 768} (P = 1, init U(-1, 1)) to a *frozen* BERT-base masked LM reading a template with
[MASK] slots; the masked-slot logits choose the prompt's words. Here the language is a closed template
grammar (a world's captions), so BERT-base is replaced by a ``transformers.BertForMaskedLM`` of a few
hundred thousand parameters trained on that grammar's sentences (``train_mlm``), with a word-level
vocabulary (one token per grammar word). Nothing about its language is general: it knows the grammar.

Training (``train_mlm``): sentences following a ``Template``; each step masks a random subset of the
slots (all of them with probability ``p_all``) and asks for the masked words (cross-entropy at masked
positions). The model always reads a prefix of ``n_prefix`` vectors before [CLS] - the place DEXTER's
soft prompt takes: with probability ``p_hint`` the prefix is the mean word embedding of a random
non-empty subset of the masked words (a *hint*), else a learned "no hint" vector. BERT-base learns
from a web corpus that a prefix can steer it; a grammar-sized model learns it from the hints.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WordMLM", "train_mlm", "SPECIALS", "save_mlm", "load_mlm"]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class WordMLM(nn.Module):
    """``BertForMaskedLM`` over a word vocabulary (``SPECIALS`` + ``words``) reading
    [prefix (P vectors)] [CLS] words [SEP]; ``forward(ids, prefix)`` -> logits (B, L, V) of the words."""

    def __init__(self, words: list[str], n_prefix: int = 1, **config):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        if len(set(words)) != len(words) or set(words) & set(SPECIALS):
            raise ValueError("words must be unique and distinct from the special tokens")
        self.vocab = SPECIALS + list(words)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.n_prefix = int(n_prefix)
        self.config = {**DEFAULT_CONFIG, **config}
        self.bert = BertForMaskedLM(BertConfig(vocab_size=len(self.vocab), pad_token_id=0, type_vocab_size=1,
                                               **self.config))
        self.no_hint = nn.Parameter(torch.zeros(self.n_prefix, self.config["hidden_size"]))

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def mask_id(self) -> int:
        return self.index["[MASK]"]

    def word_embeddings(self) -> torch.Tensor:
        return self.bert.get_input_embeddings().weight

    def encode(self, sentences: list[str]) -> torch.Tensor:
        """[CLS] words [SEP] ids (B, L); sentences of equal length (template sentences); "[MASK]" is a word."""
        rows = [[self.index["[CLS]"]] + [self.index.get(w, self.index["[UNK]"]) for w in s.split()]
                + [self.index["[SEP]"]] for s in sentences]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("sentences must have the same number of words")
        return torch.tensor(rows, device=self.no_hint.device)

    def forward(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) at the word positions (the prefix positions are dropped). ``prefix``:
        (B or 1, P, H) soft prompt; None = the learned no-hint vector."""
        B = ids.shape[0]
        prefix = self.no_hint[None] if prefix is None else prefix
        prefix = prefix.expand(B, -1, -1) if prefix.shape[0] == 1 else prefix
        emb = torch.cat([prefix.to(self.word_embeddings().dtype), self.bert.get_input_embeddings()(ids)], dim=1)
        out = self.bert(inputs_embeds=emb).logits
        return out[:, prefix.shape[1]:]


def train_mlm(sentences: list[str], template, *, steps: int = 3000, batch: int = 128, lr: float = 3e-3,
              p_all: float = 0.3, p_hint: float = 0.5, seed: int = 0, n_prefix: int = 1, holdout: float = 0.1,
              log=print, **config) -> tuple[WordMLM, dict]:
    """Train a ``WordMLM`` on template ``sentences`` (module docstring); returns it and a training record
    (held-out scores, ``_holdout_scores``)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fills = [template.slot_words(s) for s in sentences]
    if any(f is None for f in fills):
        raise ValueError("every training sentence must follow the template")
    words = sorted({w for s in sentences for w in s.split()})
    model = WordMLM(words, n_prefix=n_prefix, **config)
    ids = model.encode(sentences)
    slot_pos = torch.tensor([i + 1 for i, p in enumerate(template.parts) if p == "{}"])  # +1: [CLS]
    perm = torch.randperm(len(ids), generator=g)
    n_hold = int(round(holdout * len(ids)))
    hold, train = ids[perm[:n_hold]], ids[perm[n_hold:]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    S, t0 = len(slot_pos), time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        x = train[torch.randint(len(train), (batch,), generator=g)]
        k = torch.randint(1, S + 1, (batch,), generator=g)
        k = torch.where(torch.rand(batch, generator=g) < p_all, torch.full_like(k, S), k)
        order = torch.rand(batch, S, generator=g).argsort(dim=1)
        masked = order < k[:, None]  # (B, S) which slots are masked
        inp = x.clone()
        inp[:, slot_pos] = torch.where(masked, torch.full_like(inp[:, slot_pos], model.mask_id), inp[:, slot_pos])
        # hint: mean embedding of a random non-empty subset of the masked words
        use = (torch.rand(batch, S, generator=g) < 0.5) & masked
        first = (order == 0) & masked  # ensure non-empty: the first masked slot
        use = use | first
        hinted = torch.rand(batch, generator=g) < p_hint
        E = model.bert.get_input_embeddings()(x[:, slot_pos])  # (B, S, H)
        hint = (E * use[..., None]).sum(1) / use.sum(1, keepdim=True).clamp_min(1)
        prefix = torch.where(hinted[:, None, None], hint[:, None].expand(-1, n_prefix, -1),
                             model.no_hint[None].expand(batch, -1, -1))
        logits = model(inp, prefix)[:, slot_pos]  # (B, S, V)
        loss = F.cross_entropy(logits[masked], x[:, slot_pos][masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"[mlm] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    valid = torch.zeros(S, len(model.vocab))
    valid[torch.arange(S)[:, None].expand(-1, len(ids)), ids[:, slot_pos].T] = 1.0
    info = dict(words=len(words), params=sum(p.numel() for p in model.parameters()), steps=steps, batch=batch,
                lr=lr, p_all=p_all, p_hint=p_hint, seed=seed, n_prefix=n_prefix, n_train=len(train), n_holdout=n_hold,
                holdout=_holdout_scores(model, hold, slot_pos, valid),
                wall_seconds=round(time.time() - t0, 1), final_loss=round(loss.item(), 5))
    return model, info


@torch.no_grad()
def _holdout_scores(model: WordMLM, hold: torch.Tensor, slot_pos: torch.Tensor, valid: torch.Tensor) -> dict:
    """Held-out scores with every slot masked. ``valid`` (S, V): words seen in each slot in training.
    valid_mass: probability on words valid for the slot (no hint); marginal_entropy: entropy of the
    valid part over log(#valid) (1 = uniform, the grammar's marginal); hint_accuracy: the slot words
    recovered from a hint of all of them (the prefix can steer every slot)."""
    if len(hold) == 0:
        return {}
    inp = hold.clone()
    inp[:, slot_pos] = model.mask_id
    p = model(inp)[:, slot_pos].softmax(-1)  # (N, S, V)
    mass = (p * valid).sum(-1)
    q = (p * valid) / mass[..., None]
    ent = -(q.clamp_min(1e-12).log() * q).sum(-1) / valid.sum(-1).log()
    E = model.bert.get_input_embeddings()(hold[:, slot_pos]).mean(1, keepdim=True)
    hint = model(inp, E.expand(-1, model.n_prefix, -1))[:, slot_pos].argmax(-1)
    return dict(valid_mass=round(float(mass.mean()), 4), marginal_entropy=round(float(ent.mean()), 4),
                hint_accuracy=round(float((hint == hold[:, slot_pos]).float().mean()), 4))


def save_mlm(model: WordMLM, path: str | Path, meta: dict) -> Path:
    """``<path>.safetensors`` (weights) and ``<path>.json`` (vocabulary, config, ``meta``)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path.with_suffix(".safetensors")))  # handles the tied decoder / embedding weights
    info = dict(words=model.vocab[len(SPECIALS):], n_prefix=model.n_prefix, config=model.config, **meta)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def load_mlm(path: str | Path) -> tuple[WordMLM, dict]:
    """A ``WordMLM`` saved by ``save_mlm`` (eval mode, frozen) and its metadata."""
    from safetensors.torch import load_model

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    model = WordMLM(meta["words"], n_prefix=meta["n_prefix"], **meta["config"])
    load_model(model, str(path.with_suffix(".safetensors")))
    return model.eval().requires_grad_(False), meta
