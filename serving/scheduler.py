"""Continuous batching: admit while blocks last, chunked prefill, preempt-and-recompute, FCFS.

Every step the scheduler decides which sequences advance and by how many tokens:

1. decode: every running sequence with one token pending (its last sampled token) advances by
   one, oldest first. When one needs a new block and none is free, the newest running sequence
   is preempted (its blocks freed, its tokens recomputed later): FCFS keeps the oldest alive.
2. prefill: the rest of a step's token budget (`chunk_tokens`) goes to running sequences
   still prefilling, oldest first, then to waiting sequences in arrival order while blocks
   and running slots last. A prompt longer than the budget is prefilled over several steps.
   A waiting sequence that does not fit blocks the ones behind it (no overtaking).

A preempted sequence returns to the waiting queue at its arrival position with its prompt and
everything generated so far, all to be prefilled again (recompute, not swap).
"""

from __future__ import annotations

import bisect
import dataclasses

from serving.cache import PAGE, BlockAllocator, blocks_for
from serving.sampler import SamplingParams


@dataclasses.dataclass(eq=False)
class Sequence:
    rid: int
    prompt: list[int]
    params: SamplingParams
    arrival: float
    tokens: list[int] = dataclasses.field(default_factory=list)   # prompt ++ generated
    cached: int = 0                                                # tokens whose latents are in the cache
    blocks: list[int] = dataclasses.field(default_factory=list)
    preemptions: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    text: str | None = None

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return len(self.tokens) - self.cached


@dataclasses.dataclass
class Plan:
    prefill: list[tuple[Sequence, int]]     # (sequence, chunk length)
    decode: list[Sequence]
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, num_blocks: int, max_running: int, chunk_tokens: int):
        if max_running <= 0 or chunk_tokens <= 0:
            raise ValueError(f"{max_running=} and {chunk_tokens=} must be positive")
        self.allocator = BlockAllocator(num_blocks)
        self.max_running, self.chunk_tokens = max_running, chunk_tokens
        self.waiting: list[Sequence] = []        # by rid (arrival order)
        self.running: list[Sequence] = []        # by rid
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = blocks_for(len(seq.prompt) + seq.params.max_tokens)
        if need > self.allocator.num_blocks:
            raise ValueError(f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.params.max_tokens}) needs "
                             f"{need} cache blocks of {PAGE}; the cache has {self.allocator.num_blocks}")
        self._enqueue(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []

    def schedule(self) -> Plan:
        plan = Plan([], [], [])
        for seq in list(self.running):
            if seq.pending == 1 and seq in self.running and self._grow_or_preempt(seq, plan):
                plan.decode.append(seq)
        budget = self.chunk_tokens
        for seq in [s for s in self.running if s.pending > 1]:
            n = self._fit(seq, min(seq.pending, budget))
            if n:
                plan.prefill.append((seq, n))
                budget -= n
            if budget == 0:
                break
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            n = self._fit(seq, min(seq.pending, budget))
            if n == 0:
                break
            self.waiting.pop(0)
            bisect.insort(self.running, seq, key=lambda s: s.rid)
            plan.prefill.append((seq, n))
            budget -= n
        if not plan.prefill and not plan.decode and self.running:     # every block held by partial prefills
            self._preempt(self.running[-1], plan)
            later = self.schedule()
            return Plan(later.prefill, later.decode, plan.preempted + later.preempted)
        return plan

    def _grow_or_preempt(self, seq: Sequence, plan: Plan) -> bool:
        """Room for one more token of a decoding sequence, preempting the newest; False if seq went."""
        while self._fit(seq, 1) == 0:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `tokens` more tokens of a running sequence (multi-step decode); False if short."""
        return self._fit(seq, tokens) == tokens

    def _fit(self, seq: Sequence, want: int) -> int:
        """Allocate blocks for up to `want` more tokens of seq; returns how many fit."""
        room = len(seq.blocks) * PAGE - seq.cached + self.allocator.num_free * PAGE
        n = min(want, room)
        extra = blocks_for(seq.cached + n) - len(seq.blocks)
        if n > 0 and extra > 0:
            seq.blocks += self.allocator.allocate(extra)
        return max(n, 0)

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.cached = [], 0
        seq.preemptions += 1
        self.preemptions += 1
        plan.decode = [s for s in plan.decode if s is not seq]
        plan.preempted.append(seq)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.rid)
