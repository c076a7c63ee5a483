"""The scheduler: which waiting requests start, and how much prompt goes through the model per step.

    group = scheduler.admit(running_rows)           # requests to prefill next (one LoadedVersion), maybe none
    columns = scheduler.prefill_columns(len(group), decode_rows)

Every running row decodes at every step (continuous batching at the iteration level);
what the scheduler decides is the rest of the step. Between steps it admits waiting
requests, oldest first, as one prefill group of one LoadedVersion object (the oldest request's),
as long as
- rows: the running rows plus the group's rows (n per request) stay within
  `max_running_seqs`; when nothing runs the oldest request is admitted whatever its n,
  so that no request waits for ever;
- tokens: the group's prompts, left-padded to the longest, fit in what the decode rows
  leave of `max_batched_tokens`; the oldest request is admitted even when its prompt
  alone does not fit: it is then prefilled in chunks over several steps, and the rows
  already running decode at every one of them instead of stalling behind it.
The waiting queue itself is bounded by `max_waiting_requests`, checked when a request
arrives (`Engine.stream`), so overload is answered at once (429) rather than by waiting.
There is no preemption: a request, once admitted, runs to its end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_loop.service.request import Request


@dataclass(frozen=True)
class Limits:
    max_running_seqs: int  # rows decoded per step, over all policies
    max_batched_tokens: int  # tokens per step: decode rows plus prefill tokens
    max_waiting_requests: int  # requests admitted to the queue but not started; beyond it: 429


class Scheduler:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.waiting: deque["Request"] = deque()

    def admit(self, running_rows: int) -> list["Request"]:
        """The oldest waiting requests that can start now, all of the oldest one's LoadedVersion."""
        budget = self.limits.max_batched_tokens - running_rows
        group: list["Request"] = []
        rows, width = running_rows, 0
        for request in self.waiting:
            if group and request.loaded is not group[0].loaded:
                continue  # another version's turn comes when it is the oldest
            n, longest = request.params.n, max(width, len(request.prompt_ids))
            if rows + n > self.limits.max_running_seqs and rows > 0:
                break  # first come, first served: nobody overtakes a request that does not fit yet
            if group and longest * (len(group) + 1) > budget:
                break
            group.append(request)
            rows, width = rows + n, longest
        for request in group:
            self.waiting.remove(request)
        return group

    def prefill_columns(self, prompts: int, decode_rows: int) -> int:
        """How many prompt columns of a prefill group of `prompts` prompts to run in this step."""
        return max(1, (self.limits.max_batched_tokens - decode_rows) // prompts)
