"""The sequences of a batch context and what each holds in the KV cache, and where a new prompt should go.

Pure bookkeeping, no llama.cpp calls: the scheduler (backends/llamacpp_batch.py) asks `place` where to put a
prompt and then removes and copies the cells the returned `Placement` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

Job = TypeVar("Job")


@dataclass(eq=False)
class Slot(Generic[Job]):
    """One llama.cpp sequence id. `tokens` are those whose cells it holds, at positions 0..len-1."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    job: Job | None = None  # the request decoding here; None: free (its cells kept as a prompt cache)
    last_used: int = 0


@dataclass(frozen=True)
class Placement(Generic[Job]):
    """Where a prompt goes: `slot` keeps its first `reused` cells (copied from `source` when that is another slot)."""

    slot: Slot[Job]
    source: Slot[Job] | None
    reused: int


def common_prefix(held: list[int], prompt: list[int]) -> int:
    count = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        count += 1
    return count


class Slots(Generic[Job]):
    def __init__(self, count: int) -> None:
        self.all: list[Slot[Job]] = [Slot(seq_id) for seq_id in range(count)]
        self._clock = 0

    def free(self) -> int:
        return sum(slot.job is None for slot in self.all)

    def active(self) -> list[Slot[Job]]:
        return [slot for slot in self.all if slot.job is not None]

    def place(self, prompt: list[int]) -> Placement[Job]:
        """The free slot for `prompt` and the longest prefix of it already held by any slot (busy ones too).

        At least the prompt's last token is always evaluated again: its logits give the first answer token.
        Preferred: the free slot holding that prefix itself (nothing to copy); else the least recently used free
        slot, whose cached cells are the cheapest to lose. Raises LookupError when no slot is free.
        """
        free = [slot for slot in self.all if slot.job is None]
        if not free:
            raise LookupError("no free slot")
        best, source = 0, None
        busy = [slot for slot in self.all if slot.job is not None]
        for slot in free + busy:  # free ones first: on a tie, reusing one in place copies nothing
            shared = common_prefix(slot.tokens, prompt)
            if shared > best:
                best, source = shared, slot
        reused = min(best, len(prompt) - 1)
        if reused <= 0 or source is None:
            return Placement(min(free, key=lambda slot: slot.last_used), None, 0)
        if source.job is None:
            return Placement(source, source, reused)
        return Placement(min(free, key=lambda slot: slot.last_used), source, reused)

    def touch(self, slot: Slot[Job]) -> None:
        self._clock += 1
        slot.last_used = self._clock
