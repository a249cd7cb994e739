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


@dataclass(frozen=True)
class Placement(Generic[Job]):
    """Where a prompt goes: `slot` gets the first `reused` cells of `source` (itself: kept, another: copied)."""

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

    def free(self) -> int:
        return sum(slot.job is None for slot in self.all)

    def active(self) -> list[Slot[Job]]:
        return [slot for slot in self.all if slot.job is not None]

    def place(self, prompt: list[int]) -> Placement[Job]:
        """The lowest-numbered free slot for `prompt`, and the longest prefix of it any slot holds (busy ones too).

        Lowest-numbered: llama.cpp splits a batch over per-sequence KV streams into micro-batches of consecutive
        sequence ids only, so sequences 0, 1, 3 take two passes over the weights where 0, 1, 2 take one; filling
        the lowest gap keeps the active ids together. The prefix is copied from wherever it is held (the slot
        itself when it is the one chosen: nothing to copy). At least the prompt's last token is evaluated again:
        its logits give the first answer token. Raises LookupError when no slot is free.
        """
        free = [slot for slot in self.all if slot.job is None]
        if not free:
            raise LookupError("no free slot")
        chosen = free[0]
        best, source = common_prefix(chosen.tokens, prompt), chosen
        for slot in self.all:
            shared = common_prefix(slot.tokens, prompt)
            if shared > best:
                best, source = shared, slot
        reused = min(best, len(prompt) - 1)
        if reused <= 0:
            return Placement(chosen, None, 0)
        return Placement(chosen, source, reused)
