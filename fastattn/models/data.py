"""A built-in synthetic translation task (no downloads).

A source sentence is a random sequence of "words" (shown as lowercase letters) of random
length; its translation is the sentence reversed, each word replaced through a fixed random
dictionary (shown as uppercase letters): ``c a f -> F' A' C'``. Learning it needs real
cross-attention (the target position to read depends on the source length) and correct key
padding masks (sentences in a batch have different lengths).

Token ids: 0 = PAD, 1 = BOS, 2 = EOS, then the words. Batches are right-padded with PAD.
"""

from __future__ import annotations

import dataclasses
import string
from typing import NamedTuple, Optional, Sequence

import torch

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3


class Batch(NamedTuple):
    src: torch.Tensor  # (B, S) source ids, PAD after each sentence
    tgt_in: torch.Tensor  # (B, T) decoder input: BOS + translation, PAD after
    tgt_out: torch.Tensor  # (B, T) decoder target: translation + EOS, PAD after (ignored by the loss)


@dataclasses.dataclass(frozen=True)
class SyntheticTranslation:
    """The task's parameters; :meth:`sample` draws batches.

    Arguments:
        n_words: vocabulary words, in [1, 26]. min_len, max_len: sentence lengths, 1 <=
            min_len <= max_len. seed: seeds the dictionary only (batches use the generator
            passed to :meth:`sample`).
    """

    n_words: int = 16  # at most 26 (one letter per word when shown)
    min_len: int = 3
    max_len: int = 10
    seed: int = 0  # seeds the dictionary only

    def __post_init__(self) -> None:
        if not 1 <= self.n_words <= len(string.ascii_lowercase):
            raise ValueError(f"n_words must be in [1, 26], got {self.n_words}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_words

    @property
    def max_target_len(self) -> int:
        """Decoder sequence length: the translation plus BOS (input) or EOS (target)."""
        return self.max_len + 1

    def dictionary(self) -> torch.Tensor:
        """(vocab_size,) id -> translated id; the special tokens map to themselves."""
        gen = torch.Generator().manual_seed(self.seed)
        words = torch.randperm(self.n_words, generator=gen) + N_SPECIAL
        return torch.cat([torch.arange(N_SPECIAL), words])

    def translate(self, words: Sequence[int]) -> list[int]:
        """The reference translation of one sentence (ids; PAD/BOS/EOS are skipped)."""
        table = self.dictionary().tolist()
        return [table[int(w)] for w in reversed(list(words)) if int(w) >= N_SPECIAL]

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None, device="cpu") -> Batch:
        """A batch of random sentences and their translations, padded to the longest one."""
        lengths = torch.randint(self.min_len, self.max_len + 1, (batch_size,), generator=generator)
        longest = int(lengths.max())
        words = torch.randint(N_SPECIAL, self.vocab_size, (batch_size, longest), generator=generator)
        pos = torch.arange(longest)
        real = pos[None, :] < lengths[:, None]  # (B, S)
        src = words.masked_fill(~real, PAD)
        # reversed: target position i reads source position len - 1 - i
        rev = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)
        tgt = self.dictionary()[src.gather(1, rev)].masked_fill(~real, PAD)  # (B, S)
        tgt_in = torch.cat([torch.full((batch_size, 1), BOS), tgt], dim=1)
        tgt_out = torch.cat([tgt, torch.full((batch_size, 1), PAD)], dim=1)
        tgt_out[torch.arange(batch_size), lengths] = EOS
        return Batch(src.to(device), tgt_in.to(device), tgt_out.to(device))

    def to_text(self, ids: Sequence[int], target: bool = False) -> str:
        """A sentence as letters (uppercase on the target side), up to the first EOS or PAD."""
        letters = string.ascii_uppercase if target else string.ascii_lowercase
        words = []
        for i in self.strip(ids):
            if i == PAD:
                break
            words.append(letters[i - N_SPECIAL] if i >= N_SPECIAL else "<bos>")
        return " ".join(words)

    @staticmethod
    def strip(ids: Sequence[int]) -> list[int]:
        """The ids before the first EOS (a correct translation is exactly translate(src))."""
        out = []
        for i in ids:
            if int(i) == EOS:
                break
            out.append(int(i))
        return out
