"""The model runner: runs the forward passes the scheduler asked for, and keeps the KV caches.

    runner.prefilling = Prefill.of(requests)       # prompts of one LoadedVersion, left-padded
    logits = runner.prefill(prefill, columns)      # (k, V) once the whole prompt is in, else None
    runner.start(prefill, rows, origin)            # its rows (n per request) join their version's batch
    logits = runner.decode(batch)                  # (B, V): one step for every row of the batch
    runner.keep(batch, rows)                       # the rows still going

Layout: the rows of a batch are right-aligned in one transformers `DynamicCache`
(keys/values `(B, heads, T, head_dim)` per layer): row i's tokens fill the last columns
of the cache, the columns before them are padding, masked out by `batch.mask` `(B, T)`.
Every row's newest token is in the last column, so one decode step is one forward of
`(B, 1)` token ids with per-row positions. This is transformers' own layout for batched
generation with left padding; what it adds is that rows come and go between steps:
- new rows are prefilled apart (several prompts at once, left-padded, in column chunks
  so that a long prompt does not stall the running rows), their cache repeated to n
  rows per request, then concatenated to the batch after padding the shorter of the two
  on the left;
- finished rows are dropped (`batch_select_indices`), then leading columns that are
  padding in every remaining row are cut off.
Rows of different LoadedVersion objects never share a forward: one batch per LoadedVersion, and a
batch whose last row finished is dropped, so the runner holds no reference to an old
version once it has drained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from rlhf_loop.service.loaded import LoadedVersion
    from rlhf_loop.service.request import Choice, Request


@dataclass(eq=False)
class Prefill:
    """Prompts of one LoadedVersion going through the model together, left-padded to one length."""

    loaded: "LoadedVersion"
    requests: list["Request"]
    ids: torch.Tensor  # (k, L) prompt ids, right-aligned, padding before them
    mask: torch.Tensor  # (k, L) 1 on prompt tokens
    cache: DynamicCache
    padded: bool  # some prompt is shorter than the longest
    done: int = 0  # columns already run

    @classmethod
    def of(cls, requests: list["Request"]) -> "Prefill":
        loaded = requests[0].loaded
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        cache = loaded.new_cache()
        _layers(cache)  # refuse a model this layout cannot batch before any work is done
        padded = len({len(r.prompt_ids) for r in requests}) > 1
        return cls(loaded, list(requests), ids.to(loaded.device), mask.to(loaded.device), cache, padded)

    @property
    def width(self) -> int:
        return self.ids.shape[1]


@dataclass(eq=False)
class Batch:
    """The running rows of one LoadedVersion and their right-aligned KV cache."""

    loaded: "LoadedVersion"
    rows: list["Choice"]  # row i of the cache and the mask
    cache: DynamicCache
    mask: torch.Tensor  # (B, T) 1 where column t holds a token of row i
    padded: bool  # the mask has a 0: without one the model needs no mask (faster for one request alone)


class ModelRunner:
    def __init__(self) -> None:
        self.batches: list[Batch] = []  # one per LoadedVersion object with running rows
        self.prefilling: Prefill | None = None  # the prompts going in, one group at a time

    @property
    def rows(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    def prefill(self, prefill: Prefill, columns: int) -> torch.Tensor | None:
        """Run the next `columns` columns of the prompts; the last position's (k, V) logits once all are in."""
        start, end = prefill.done, min(prefill.done + columns, prefill.width)
        positions = (prefill.mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]  # (k, C); padding gets 0, masked anyway
        mask = prefill.mask[:, :end] if prefill.padded else None
        logits, prefill.cache = prefill.loaded.forward(prefill.ids[:, start:end], mask, positions, prefill.cache)
        prefill.done = end
        return logits if end == prefill.width else None

    def start(self, prefill: Prefill, rows: list["Choice"], origin: list[int]) -> None:
        """Make `rows` running: row j continues prompt `origin[j]` of `prefill` (its cache repeated per choice)."""
        index = torch.tensor(origin, device=prefill.ids.device)
        prefill.cache.batch_select_indices(index)
        new = Batch(prefill.loaded, rows, prefill.cache, prefill.mask[index], prefill.padded)
        batch = self.batch_of(prefill.loaded)
        if batch is None:
            self.batches.append(new)
        else:
            _concat(batch, new)

    def batch_of(self, loaded: "LoadedVersion") -> Batch | None:
        return next((b for b in self.batches if b.loaded is loaded), None)

    def decode(self, batch: Batch) -> torch.Tensor:
        """One step for every row of `batch`: feed each row's last sampled token; (B, V) logits."""
        ids = torch.tensor([[c.token_ids[-1]] for c in batch.rows], device=batch.mask.device)  # (B, 1)
        positions = batch.mask.sum(-1, keepdim=True)  # (B, 1): the tokens each row already has
        batch.mask = F.pad(batch.mask, (0, 1), value=1)
        logits, batch.cache = batch.loaded.forward(ids, batch.mask if batch.padded else None, positions, batch.cache)
        return logits

    def keep(self, batch: Batch, rows: list[int]) -> None:
        """Keep only `rows` of `batch` (by index); a batch left empty is dropped with its cache."""
        if not rows:
            self.batches.remove(batch)
            return
        if len(rows) == len(batch.rows):
            return
        index = torch.tensor(rows, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in rows]
        batch.mask = batch.mask[index]
        unused = int(batch.mask.any(0).int().argmax())  # leading columns that no remaining row uses
        if unused:
            batch.mask = batch.mask[:, unused:]
            for layer in _layers(batch.cache):
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        batch.padded = bool((batch.mask == 0).any())


def _concat(batch: Batch, new: Batch) -> None:
    """Append `new`'s rows to `batch`, left-padding whichever is shorter so both stay right-aligned."""
    width = max(batch.mask.shape[1], new.mask.shape[1])
    batch.padded = batch.padded or new.padded or batch.mask.shape[1] != new.mask.shape[1]

    def pad(x: torch.Tensor, dim_from_end: int, to: int) -> torch.Tensor:
        missing = to - x.shape[-dim_from_end]
        return x if missing == 0 else F.pad(x, (0, 0) * (dim_from_end - 1) + (missing, 0))

    for a, b in zip(_layers(batch.cache), _layers(new.cache)):
        a.keys = torch.cat([pad(a.keys, 2, width), pad(b.keys, 2, width)])
        a.values = torch.cat([pad(a.values, 2, width), pad(b.values, 2, width)])
    batch.mask = torch.cat([pad(batch.mask, 1, width), pad(new.mask, 1, width)])
    batch.rows = batch.rows + new.rows


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, which must be plain full-attention ones: their columns are the batch layout."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"continuous batching needs full-attention cache layers, not {type(layer).__name__} "
                            "(sliding-window and linear-attention models are not supported)")
    return cache.layers
