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
Sliding-window layers (Gemma 2/3's local layers, Mistral's and Qwen2's window) are
transformers' own `DynamicSlidingWindowLayer`, in the same layout: since every row's newest
token is in the last column, no row's window reaches further back than the last
`window - 1` columns, which is all such a layer keeps; its `cumulative_length` is the
batch's column count T, from which the model's own mask code places the window
(`get_mask_sizes`) over the batch mask's columns. So the forward is transformers' own,
exactly as in `generate`; concatenating and cutting columns (`_fit`) keeps both true.
What else a cache can hold (linear-attention or convolution state, chunked attention, layers
sharing another's keys) has no columns to align: such a model is refused when a version is
loaded (`cannot_batch`), before it serves anything.
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
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

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
            for layer in batch.cache.layers:
                _fit(layer, batch.mask.shape[1])
        batch.padded = bool((batch.mask == 0).any())


def _concat(batch: Batch, new: Batch) -> None:
    """Append `new`'s rows to `batch`, left-padding whichever is shorter so both stay right-aligned."""
    width = max(batch.mask.shape[1], new.mask.shape[1])
    batch.padded = batch.padded or new.padded or batch.mask.shape[1] != new.mask.shape[1]

    for a, b in zip(batch.cache.layers, new.cache.layers):
        _fit(a, width)
        _fit(b, width)
        a.keys, a.values = torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values])
    batch.mask = torch.cat([_left(batch.mask, width, dim=1), _left(new.mask, width, dim=1)])
    batch.rows = batch.rows + new.rows


# the layer types (transformers' `layer_types` names) whose cache layers this layout runs: DynamicLayer and
# DynamicSlidingWindowLayer ("chunked_attention" makes the latter too, but its mask is not a window)
BATCHED_LAYER_TYPES = ("full_attention", "sliding_attention")


def cannot_batch(config) -> str | None:
    """Why a model of `config` cannot run in this layout (one line), or None when it can: every layer of
    its cache must be full attention or a sliding window (module docstring)."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    others = sorted({t for t in layer_types if t not in BATCHED_LAYER_TYPES})
    if not others:
        return None
    where = {t: [i for i, lt in enumerate(layer_types) if lt == t] for t in others}
    return ("its cache has layers the engine cannot batch: " + ", ".join(f"{t!r} (layers {where[t]})" for t in others)
            + "; continuous batching runs full-attention and sliding-window attention layers only")


def _fit(layer: DynamicLayer, columns: int) -> None:
    """Make `layer` hold the batch's last `columns` columns: cut or left-pad its keys and values (B, H, t, D).
    A sliding-window layer holds at most its last `window - 1` of them and counts them all."""
    keep = columns
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = columns  # where the model's mask code puts the window (get_mask_sizes)
        keep = min(columns, layer.sliding_window - 1)
    layer.keys, layer.values = _left(layer.keys, keep, dim=2), _left(layer.values, keep, dim=2)


def _left(x: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`x` with `columns` entries along `dim`: its last ones, or zeros before it."""
    missing = columns - x.shape[dim]
    if missing <= 0:
        return x.narrow(dim, -missing, columns)
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (missing, 0))
