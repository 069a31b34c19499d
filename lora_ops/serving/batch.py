"""The running batch, one step at a time: KV blocks, adapter slots, preemption, sampling.

Each step (planned under the scheduler's lock, run under the model's):

1. every row that has one token left to compute (it decodes) gets room for it; when the
   KV cache has none, the newest row is preempted (its blocks freed, sent back to the head
   of its queue, its tokens computed again when it returns) until there is;
2. rows with more than one token left (new prompts, or preempted rows coming back) share
   ``prefill_chunk_tokens`` for this step, oldest first, as far as the cache has room;
3. one forward computes the prompt chunks, one more every decoding row's next token;
   rows that reached the end of what they had to compute pick their next token.

A row's tokens are its prompt plus what it generated, so a preempted row, coming back,
computes them all again and goes on where it was (its sampler's state is kept).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from lora_ops.generation import Delta
from lora_ops.serving.kv_cache import BlockPool, block_key
from lora_ops.serving.runner import ModelRunner, RowWork
from lora_ops.serving.scheduler import Scheduler, Sequence
from lora_ops.serving.stats import EngineStats


@dataclass
class StepPlan:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (row, tokens)
    decoding: list[Sequence] = field(default_factory=list)


@dataclass
class StepOutcome:
    finished: list[Sequence] = field(default_factory=list)
    deltas: list[tuple[Sequence, Delta]] = field(default_factory=list)  # what rows added


class StepPlanner:
    """Plans and runs the engine's steps over ``scheduler.running``."""

    def __init__(
        self,
        runner: ModelRunner,
        pool: BlockPool,
        scheduler: Scheduler,
        stats: EngineStats,
        prefill_chunk_tokens: int,
    ) -> None:
        self.runner = runner
        self.pool = pool
        self.scheduler = scheduler
        self.stats = stats
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefix_caching = True
        self.block_size = runner.store.block_size
        self._free_slots = list(range(runner.slots.num_slots - 1, -1, -1))

    # -- joining and leaving (the scheduler's lock held, and the model's for admit) --------

    def admit(self, sequence: Sequence, adapter_key: str) -> bool:
        """Give ``sequence`` its cached prefix, the blocks of the rest, and a slot.

        Only if the KV cache has room for all of what it must compute, plus a block to grow
        into when other rows run: admitting what the cache cannot hold would only lead to
        preempting it again.
        """
        sequence.adapter_key = adapter_key
        self._match_prefix(sequence)
        needed = self._blocks_for(len(sequence.tokens)) - len(sequence.blocks)
        headroom = 1 if self.scheduler.running else 0
        if self.pool.available() < needed + headroom:
            self._give_back(sequence)
            return False
        self._grow(sequence, sequence.uncomputed())
        if sequence.preemptions == 0:
            prompt = len(sequence.request.prompt_ids)
            self.stats.prefix_queries += prompt
            self.stats.prefix_hits += sequence.computed
            self.scheduler.charge(sequence.tenant, prompt_tokens=prompt)
        sequence.slot = self._free_slots.pop()
        self.runner.slots.fill(sequence.slot, sequence.request.adapter, adapter_key)
        self.scheduler.admit(sequence)
        return True

    def _match_prefix(self, sequence: Sequence) -> None:
        """Take the cached blocks of the longest known prefix (always leaving one token)."""
        if self._share_leaders_prompt(sequence) or not self.prefix_caching:
            return
        tokens = sequence.tokens
        block = self.block_size
        previous = b""
        for index in range((len(tokens) - 1) // block):
            key = block_key(
                previous, sequence.adapter_key, tokens[index * block : (index + 1) * block]
            )
            found = self.pool.find(key)
            if found is None:
                break
            sequence.blocks.append(found)
            sequence.block_keys.append(key)
            previous = key
        sequence.computed = len(sequence.blocks) * block

    def _share_leaders_prompt(self, sequence: Sequence) -> bool:
        """Another choice of the same request: take the full blocks of its leader's prompt.

        Done whether or not prefix caching is on: the choices of one request share their
        prefill by definition. The prompt's last (partial) block is computed again, with
        the prompt's last token, whose logits this choice samples its first token from.
        """
        leader = sequence.leader
        if leader is None or leader.slot < 0 or sequence.preemptions:
            return False
        # Only blocks the leader has computed (it may be computing them again after a
        # preemption), and never the prompt's last token.
        prompt = len(sequence.request.prompt_ids)
        full = min(leader.computed, prompt - 1) // self.block_size
        sequence.blocks = self.pool.share(leader.blocks[:full])
        sequence.block_keys = leader.block_keys[:full]
        sequence.computed = full * self.block_size
        return True

    def release(self, sequence: Sequence) -> None:
        """A running row is done: its blocks and slot go back, its queue place too."""
        self._give_back(sequence)
        self._free_slots.append(sequence.slot)
        sequence.slot = -1
        self.scheduler.finish(sequence)

    def _give_back(self, sequence: Sequence) -> None:
        self.pool.give_back(sequence.blocks)
        sequence.blocks, sequence.block_keys, sequence.computed = [], [], 0

    def drop_abandoned(self) -> list[Sequence]:
        """Release every running row whose caller went away; return them."""
        gone = [s for s in self.scheduler.running if s.abandoned()]
        for sequence in gone:
            self.release(sequence)
        for sequence in [s for s in self.scheduler.all_waiting() if s.abandoned()]:
            self.scheduler.drop_waiting(sequence)
            self.stats.abandoned += 1
        return gone

    def fail_running(self, error: Exception) -> None:
        for sequence in list(self.scheduler.running):
            self.release(sequence)
            if not sequence.future.done():
                sequence.future.set_exception(error)

    # -- planning (the scheduler's lock held) -------------------------------------------

    def plan(self) -> StepPlan:
        plan = StepPlan()
        for sequence in list(self.scheduler.running):
            running = sequence in self.scheduler.running  # not preempted for an older row
            if running and sequence.uncomputed() == 1 and self._make_room(sequence):
                plan.decoding.append(sequence)
        plan.decoding = [s for s in plan.decoding if s in self.scheduler.running]
        budget = self.prefill_chunk_tokens
        for sequence in self.scheduler.running:
            if sequence.uncomputed() <= 1 or budget == 0:
                continue
            tokens = self._grow(sequence, min(sequence.uncomputed(), budget))
            if tokens:
                plan.chunks.append((sequence, tokens))
                budget -= tokens
        return plan

    def _make_room(self, sequence: Sequence) -> bool:
        """Room for one more token of ``sequence``, preempting newer rows if need be."""
        while self._grow(sequence, 1) == 0:
            victim = self.scheduler.running[-1]
            self._preempt(victim)
            if victim is sequence:
                return False
        return True

    def _grow(self, sequence: Sequence, tokens: int) -> int:
        """Take blocks for up to ``tokens`` more of ``sequence``; return how many fit."""
        wanted = self._blocks_for(sequence.computed + tokens) - len(sequence.blocks)
        while wanted > 0:
            block = self.pool.take()
            if block is None:
                break
            sequence.blocks.append(block)
            wanted -= 1
        return min(tokens, len(sequence.blocks) * self.block_size - sequence.computed)

    def _preempt(self, sequence: Sequence) -> None:
        self._give_back(sequence)
        self._free_slots.append(sequence.slot)
        sequence.slot = -1
        self.scheduler.preempt(sequence)
        self.stats.preemptions += 1

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- running (the model's lock held) -------------------------------------------------

    def run(
        self, plan: StepPlan, tokenizer: PreTrainedTokenizerBase, eos: set[int | None]
    ) -> StepOutcome:
        outcome = StepOutcome()
        self._tidy_slots(plan.decoding)
        if plan.chunks:
            logits = self.runner.forward([self._work(s, n) for s, n in plan.chunks])
            for index, (sequence, tokens) in enumerate(plan.chunks):
                self._computed(sequence, tokens)
                if sequence.uncomputed() == 0:
                    self._pick(sequence, logits[index], tokenizer, eos, outcome)
        if plan.decoding:
            plan.decoding.sort(key=lambda s: s.slot)
            logits = self.runner.forward([self._work(s, 1) for s in plan.decoding])
            self.stats.batches += 1
            self.stats.batch_sizes[len(plan.decoding)] += 1
            for index, sequence in enumerate(plan.decoding):
                self._computed(sequence, 1)
                self._pick(sequence, logits[index], tokenizer, eos, outcome)
        return outcome

    def _work(self, sequence: Sequence, tokens: int) -> RowWork:
        start = sequence.computed
        return RowWork(
            sequence.tokens[start : start + tokens], start, sequence.blocks, sequence.slot
        )

    def _computed(self, sequence: Sequence, tokens: int) -> None:
        """Count ``tokens`` more as cached, and remember the blocks they filled."""
        sequence.computed += tokens
        if not self.prefix_caching:
            return
        full = sequence.computed // self.block_size
        if len(sequence.block_keys) >= full:
            return
        all_tokens = sequence.tokens
        block = self.block_size
        for index in range(len(sequence.block_keys), full):
            previous = sequence.block_keys[-1] if sequence.block_keys else b""
            key = block_key(
                previous, sequence.adapter_key, all_tokens[index * block : (index + 1) * block]
            )
            self.pool.remember(key, sequence.blocks[index])
            sequence.block_keys.append(key)

    def _pick(
        self,
        sequence: Sequence,
        logits: torch.Tensor,
        tokenizer: PreTrainedTokenizerBase,
        eos: set[int | None],
        outcome: StepOutcome,
    ) -> None:
        if sequence.abandoned():
            return  # dropped at the next step
        row = sequence.row
        _, piece = row.advance(logits, eos, tokenizer)
        now = time.monotonic()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self.stats.ttft.observe(sequence.tenant, now - sequence.submitted)
        elif sequence.last_token_at is not None:
            self.stats.itl.observe(sequence.tenant, now - sequence.last_token_at)
        sequence.last_token_at = now
        self.scheduler.charge(sequence.tenant, generated_tokens=1)
        # A finished row hands over the logprobs of tokens whose text it held back.
        unheard = row.logprobs is not None and row.reported < len(row.logprobs)
        if piece or (row.finish_reason is not None and unheard):
            outcome.deltas.append((sequence, row.delta(piece)))
        if row.finish_reason is not None:
            outcome.finished.append(sequence)

    def _tidy_slots(self, decoding: Seq[Sequence]) -> None:
        """Put the decoding rows in slots 0..n-1, so the step reads their weights in place.

        Moves happen only when rows joined, left or finished their prompts; the spare slot
        (one more than the batch holds) makes a swap of two rows possible.
        """
        count = len(decoding)
        holder = {s.slot: s for s in self.scheduler.running}
        for sequence in sorted(decoding, key=lambda s: s.slot):
            if sequence.slot < count:
                continue
            target = next(i for i in range(count) if holder.get(i) not in decoding)
            other = holder.get(target)
            source = sequence.slot
            if other is not None:  # swap through a free slot
                spare = self._free_slots[-1]
                self.runner.slots.move(target, spare)
                self.runner.slots.move(source, target)
                self.runner.slots.move(spare, source)
                other.slot = source
                holder[source] = other
            else:
                self.runner.slots.move(source, target)
                self._free_slots.remove(target)
                self._free_slots.append(source)
                del holder[source]
            sequence.slot = target
            holder[target] = sequence
