"""Scheduler and KV-block decisions on plain data: admission, chunked prefill, preemption, abort, prefix reuse."""

from __future__ import annotations

import pytest

from worker.kv_blocks import BlockManager
from worker.scheduler import QueueFull, ScheduledChunk, Scheduler
from worker.sequence import Sequence, Status


def make_seq(request_id: int, prompt: list[int], max_tokens: int = 100) -> Sequence:
    return Sequence((b"peer", request_id), list(prompt), len(prompt), max_tokens)


def run_step(scheduler: Scheduler, next_token: int = 7) -> list[ScheduledChunk]:
    """What the engine does around the model: advance, then append a sampled token where a chunk completed."""
    chunks = scheduler.schedule()
    scheduler.on_computed(chunks)
    for chunk in chunks:
        if chunk.completes:
            chunk.seq.token_ids.append(next_token)
    return chunks


def test_new_requests_join_the_running_batch_at_the_next_step() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_running=8, max_waiting=8, max_prefill_tokens=64)
    a = make_seq(1, list(range(10)))
    scheduler.add(a)
    assert [(c.seq, c.num_tokens) for c in run_step(scheduler)] == [(a, 10)]
    b = make_seq(2, list(range(100, 106)))
    scheduler.add(b)
    chunks = run_step(scheduler)
    assert [(c.seq, c.num_tokens) for c in chunks] == [(a, 1), (b, 6)]
    assert all(c.completes for c in chunks)
    assert [(c.seq, c.num_tokens) for c in run_step(scheduler)] == [(a, 1), (b, 1)]


def test_long_prompt_is_prefilled_in_chunks_while_decoders_keep_decoding() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_running=8, max_waiting=8, max_prefill_tokens=16)
    short = make_seq(1, [1, 2, 3])
    scheduler.add(short)
    run_step(scheduler)
    long = make_seq(2, list(range(40)))
    scheduler.add(long)
    prompt_tokens = []
    for _ in range(3):  # 16 + 16 + 8 prompt tokens, each step beside one decode token that does not count
        chunks = run_step(scheduler)
        assert chunks[0].seq is short and chunks[0].num_tokens == 1  # the stream never stalls
        prompt_tokens.append(sum(c.num_tokens for c in chunks[1:]))
    assert prompt_tokens == [16, 16, 8]
    assert long.num_computed == 40 and long.num_tokens == 41  # prefilled over 3 steps, then first token


def test_max_running_and_max_waiting_limits() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_running=2, max_waiting=2, max_prefill_tokens=64)
    seqs = [make_seq(i, [i, i + 1]) for i in range(4)]
    for seq in seqs[:2]:
        scheduler.add(seq)  # both fit free running slots, even before a step admits them
    run_step(scheduler)
    scheduler.add(seqs[2])
    scheduler.add(seqs[3])
    with pytest.raises(QueueFull):
        scheduler.add(make_seq(9, [1]))
    chunks = run_step(scheduler)
    assert {c.seq for c in chunks} == set(seqs[:2])  # no third runner
    scheduler.finish(seqs[0])
    chunks = run_step(scheduler)
    assert seqs[2] in {c.seq for c in chunks} and seqs[3] not in {c.seq for c in chunks}


def test_abort_frees_blocks_at_once_waiting_or_running() -> None:
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(blocks, max_running=1, max_waiting=4, max_prefill_tokens=64)
    running, waiting = make_seq(1, list(range(9))), make_seq(2, list(range(5)))
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    assert blocks.num_used == 3
    assert scheduler.find((b"peer", 2)) is waiting
    scheduler.finish(waiting)
    scheduler.finish(running)
    assert blocks.num_used == 0 and not scheduler.has_work()
    assert running.status is Status.FINISHED and scheduler.find((b"peer", 1)) is None


def test_out_of_blocks_preempts_the_newest_and_it_resumes_later() -> None:
    released: list[Sequence] = []  # what a runner with per-sequence state is told to drop
    blocks = BlockManager(4, 4, on_release=released.append)  # 16 tokens in all
    scheduler = Scheduler(blocks, max_running=4, max_waiting=4, max_prefill_tokens=64)
    old, new = make_seq(1, list(range(7))), make_seq(2, list(range(50, 57)))
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # 7+7 tokens prefilled, 4 blocks used, both hold a sampled token
    run_step(scheduler)  # each decodes into its second block
    assert blocks.num_free == 0
    chunks = run_step(scheduler)  # old needs a third block: new is preempted
    assert [c.seq for c in chunks] == [old]
    assert new.status is Status.WAITING and scheduler.waiting[0] is new and scheduler.num_preemptions == 1
    assert new.num_output_tokens == 2  # its output survives and is recomputed, not lost
    assert new in released and old not in released  # its KV is gone: a per-sequence cache must go with it
    scheduler.finish(old)
    assert old in released
    chunks = run_step(scheduler)
    assert chunks[0].seq is new and new.status is Status.RUNNING


@pytest.mark.parametrize(("prefix_caching", "cached"), [(True, 12), (False, 0)], ids=["cached", "caching-off"])
def test_a_shared_prefix_reuses_its_blocks_unless_caching_is_off(prefix_caching: bool, cached: int) -> None:
    blocks = BlockManager(32, 4, prefix_caching=prefix_caching)
    scheduler = Scheduler(blocks, max_running=4, max_waiting=4, max_prefill_tokens=64)
    system = list(range(100, 112))  # 3 full blocks
    first = make_seq(1, system + [1, 2])
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first)
    second = make_seq(2, system + [3, 4, 5])
    scheduler.add(second)
    chunks = run_step(scheduler)
    assert second.num_cached == cached and chunks[0].num_tokens == 15 - cached
    assert blocks.num_prefix_hits == cached
    assert bool(blocks.by_hash) is prefix_caching  # off: nothing is even registered


def test_prefix_match_always_leaves_a_token_to_compute() -> None:
    blocks = BlockManager(32, 4)
    scheduler = Scheduler(blocks, max_running=4, max_waiting=4, max_prefill_tokens=64)
    prompt = list(range(8))  # exactly 2 blocks
    first = make_seq(1, prompt)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first)
    again = make_seq(2, prompt)
    scheduler.add(again)
    chunks = run_step(scheduler)
    assert again.num_cached == 4 and chunks[0].num_tokens == 4 and chunks[0].completes


def test_cached_block_is_not_reused_when_its_tokens_differ_despite_a_hash_match() -> None:
    blocks = BlockManager(8, 2)
    seq = make_seq(1, [5, 6, 7])
    blocks.grow(seq, 3)
    seq.num_computed = 3
    blocks.register_full_blocks(seq, 0)
    blocks.release(seq)
    block_id = next(iter(blocks.by_hash.values()))
    blocks.blocks[block_id].tokens = (9, 9)  # simulate a collision: same hash key, other tokens
    other = make_seq(2, [5, 6, 8])
    blocks.match_prefix(other)
    assert other.num_cached == 0


def test_shared_blocks_are_freed_only_when_the_last_user_leaves() -> None:
    blocks = BlockManager(8, 2)
    scheduler = Scheduler(blocks, max_running=4, max_waiting=4, max_prefill_tokens=64)
    a = make_seq(1, [1, 2, 3, 4, 5])
    scheduler.add(a)
    run_step(scheduler)
    b = make_seq(2, [1, 2, 3, 4, 9])
    scheduler.add(b)
    run_step(scheduler)
    assert b.num_cached == 4 and b.block_table[:2] == a.block_table[:2]
    scheduler.finish(a)
    assert all(blocks.blocks[i].ref_count == 1 for i in b.block_table[:2])
    scheduler.finish(b)
    assert blocks.num_used == 0


def test_requests_bound_for_free_running_slots_do_not_count_as_waiting() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_running=2, max_waiting=0, max_prefill_tokens=64)
    scheduler.add(make_seq(1, [1, 2]))
    scheduler.add(make_seq(2, [3, 4]))  # arrives before any step: still fits a running slot
    with pytest.raises(QueueFull):
        scheduler.add(make_seq(3, [5, 6]))
