"""Teacher logits stored sparsely: the top-k classes per view, and the teacher distribution rebuilt from them.

A view's logits ``z`` (``C`` classes) are stored as the indices of its ``k`` largest logits
(int16 when ``C`` fits) and their log-probabilities at temperature 1, ``z - logsumexp(z)``, in
float16: near 0 for the likely classes, where float16 is most precise (storing raw logits of
magnitude 10 would cost ~0.4% per probability), plus the log of the total mass of the other
``C - k`` classes, ``log r`` (float16, computed in float32 before rounding: ``1 - sum(top-k)``
of rounded values would lose a small tail entirely).

How the tail comes back (``tail=``):

- ``"spread"`` (default): the ``C - k`` other classes share ``r`` equally. At temperature 1 this
  is the true distribution wherever it is known (top-k probabilities and total tail mass) and
  flat where it is not. For a temperature ``T`` it is the tempered softmax of the same
  log-probabilities (tail classes at ``log(r / (C - k))``): exact when the tail really is flat,
  close when the teacher is confident.
- ``"renormalise"``: the tail is dropped and the top-k probabilities are rescaled to sum to 1.

With ``k = C`` both are exact at every temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from shardstore.errors import ConfigError

TAILS = ("spread", "renormalise")


@dataclass(frozen=True)
class SparseLogits:
    """The top-k of a batch of logit vectors: ``indices`` and ``log_probs`` (at T = 1), both ``[..., k]``,
    and ``tail_log_mass`` ``[...]`` (``-inf`` when every class is kept)."""

    indices: Tensor
    log_probs: Tensor
    tail_log_mass: Tensor
    num_classes: int


def index_dtype(num_classes: int) -> torch.dtype:
    """int16 when every class index fits in it, else int32."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def encode_topk(logits: Tensor, k: int) -> SparseLogits:
    """Keep the ``k`` most likely classes of each vector (last dimension) and their log-probabilities."""
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ConfigError(f"top-k must be between 1 and the {num_classes} classes, got k={k}")
    all_log_p = torch.log_softmax(logits.float(), dim=-1)
    log_p, indices = torch.topk(all_log_p, k, dim=-1)
    tail = torch.logsumexp(all_log_p.scatter(-1, indices, float("-inf")), dim=-1)
    return SparseLogits(indices.to(index_dtype(num_classes)), log_p.to(torch.float16), tail.to(torch.float16),
                        num_classes)


def teacher_log_probs(sparse: SparseLogits, temperature: float = 1.0, tail: str = "spread") -> Tensor:
    """The teacher's log-probabilities ``[..., C]`` at ``temperature``, rebuilt from its top-k (see the module doc)."""
    if tail not in TAILS:
        raise ConfigError(f"unknown tail {tail!r}; choose from {', '.join(TAILS)}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    top_log_p = sparse.log_probs.float()  # log-probabilities of the kept classes at T = 1 (float16-rounded)
    indices = sparse.indices.long()
    k, num_classes = top_log_p.shape[-1], sparse.num_classes
    if tail == "renormalise" or k == num_classes:
        pseudo = torch.full((*top_log_p.shape[:-1], num_classes), float("-inf"), device=top_log_p.device)
        pseudo.scatter_(-1, indices, top_log_p)
        return torch.log_softmax(pseudo / temperature, dim=-1)
    tail_log_p = sparse.tail_log_mass.float().unsqueeze(-1) - math.log(num_classes - k)
    pseudo = tail_log_p.expand(*top_log_p.shape[:-1], num_classes).clone()
    pseudo.scatter_(-1, indices, top_log_p)
    return torch.log_softmax(pseudo / temperature, dim=-1)
