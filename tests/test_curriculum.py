"""The complexity curriculum (paper §3.2): ordering rules, fairseq's order when off, 2 gloo ranks,
and an exact mid-epoch resume (CPU)."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fairseq_adaptive_moe  # noqa: F401  (registers the task, allows checkpoints)
from conftest import BIN, ROOT, USER_DIR, prepare_m30k, run_cli
from fairseq_adaptive_moe.data.curriculum import (
    ComplexityTracker,
    balance_steps,
    batch_complexity_spread,
    batch_loads,
    curriculum_batches,
    curriculum_order,
    sample_keys,
    sample_complexity,
    shuffle_in_buckets,
    step_imbalance,
)

# ---------------------------------------------------------------------------------------------
# ordering on hand-built complexity vectors


def tracker_from(rows):
    """rows: per sample, a list of (multi, tokens) per layer, or None for unseen."""
    num_layers = len(next(r for r in rows if r is not None))
    t = ComplexityTracker(len(rows))
    packed = [[i] + [m for m, _ in r] + [n for _, n in r] for i, r in enumerate(rows) if r]
    t.update(torch.tensor(packed))
    assert t.num_layers == num_layers
    return t


def order_of(tracker, indices=None, lengths=None):
    indices = np.arange(tracker.num_samples) if indices is None else np.asarray(indices)
    seen, unseen = curriculum_order(indices, tracker.multi, tracker.tokens, lengths)
    return seen.tolist(), unseen.tolist()


def test_anchor_then_cosine_similarity_most_similar_first():
    #            C = [r_enc, r_dec]
    rows = [[(4, 10), (0, 10)],    # 0: [0.4, 0.0]  4 two-expert tokens
            [(1, 10), (1, 10)],    # 1: [0.1, 0.1]  2 two-expert tokens: the anchor
            [(5, 10), (5, 10)],    # 2: [0.5, 0.5]  parallel to the anchor: cos 1
            [(2, 10), (6, 10)],    # 3: [0.2, 0.6]  cos 0.894
            [(0, 10), (3, 10)]]    # 4: [0.0, 0.3]  cos 0.707 (0 ties with it at 0.707)
    seen, unseen = order_of(tracker_from(rows))
    assert seen[0] == 1 and seen[1] == 2 and seen[2] == 3
    assert set(seen[3:]) == {0, 4} and unseen == []
    # 0 and 4 tie at cos 0.707: the shorter comes first, then the lower id
    assert order_of(tracker_from(rows), lengths=[9, 5, 5, 5, 5])[0][3:] == [4, 0]
    assert order_of(tracker_from(rows), lengths=[5, 5, 5, 5, 5])[0][3:] == [0, 4]


def test_ties_break_by_length_then_id_and_the_anchor_leads():
    same = [(1, 4), (2, 8)]  # four identical vectors, all with 3 two-expert tokens
    tracker = tracker_from([same, same, same, same])
    assert order_of(tracker, lengths=[7, 3, 7, 3]) == ([1, 3, 0, 2], [])
    # the anchor is the one with the fewest two-expert tokens, even if a parallel one is shorter
    tracker = tracker_from([[(2, 4), (4, 8)], [(1, 4), (2, 8)]])  # same direction, 6 vs 3 tokens
    assert order_of(tracker, lengths=[1, 9]) == ([1, 0], [])


def test_zero_vectors_lead_and_unseen_samples_come_last_batched_apart():
    rows = [[(0, 5)], [(2, 5)], None, [(0, 9)], [(1, 5)], None]
    seen, unseen = order_of(tracker_from(rows), lengths=[5, 5, 2, 9, 5, 1])
    assert seen[:2] == [0, 3]            # no two-expert token at all: first, by length
    assert seen[2:] == [4, 1]            # 1D vectors are all parallel: anchor (fewest) first
    assert unseen == [5, 2]              # never seen: last, by (length, id)
    # nothing seen yet: everything is "unseen", in size order
    assert order_of(ComplexityTracker(3), lengths=[3, 1, 2]) == ([], [1, 2, 0])


def test_mean_order_puts_the_simpler_first_where_cosine_ignores_magnitude():
    """The issue's example: anchor [.05, 0, 0, 0]; cosine puts [.9, 0, 0, 0] right after it and
    ties "5% in every layer" with "100% in every layer"; the mean order does neither."""
    def layers(*shares):
        return [(int(round(100 * r)), 100) for r in shares]
    rows = [layers(.05, 0, 0, 0), layers(.9, 0, 0, 0), layers(.05, .05, .05, .05),
            layers(1, 1, 1, 1), None]
    tracker = tracker_from(rows)
    ids = np.arange(5)
    cosine = sample_keys(ids, tracker.multi, tracker.tokens, order="cosine")
    assert cosine[0] == -1 and cosine[1] == pytest.approx(0) and cosine[2] == cosine[3]
    assert np.isinf(cosine[4])
    mean = sample_keys(ids, tracker.multi, tracker.tokens, order="mean")
    assert mean[:4].tolist() == pytest.approx([.0125, .225, .05, 1.0])
    assert np.isinf(mean[4])
    assert order_of(tracker)[0] == [0, 1, 2, 3]  # curriculum_order: the paper's cosine order
    seen, unseen = curriculum_order(ids, tracker.multi, tracker.tokens, order="mean")
    assert seen.tolist() == [0, 2, 1, 3] and unseen.tolist() == [4]
    rand = sample_keys(ids, tracker.multi, tracker.tokens, order="random", seed=5)
    assert np.isfinite(rand).all() and ((0 <= rand) & (rand < 1)).all()  # unseen ones too
    assert rand.tolist() == sample_keys(ids, None, None, order="random", seed=5).tolist()
    assert rand.tolist() != sample_keys(ids, None, None, order="random", seed=6).tolist()
    with pytest.raises(ValueError, match="unknown curriculum order"):
        sample_keys(ids, tracker.multi, tracker.tokens, order="length")


def test_windowed_batches_keep_fairseqs_cut_and_order_batches_by_key():
    """Windows of fairseq batches are re-cut by key (unseen apart), then batches sorted by their
    mean key, unseen last; window 0 cuts from the global order."""
    keys = np.array([.9, .1, .5, np.inf, .2, .8, .3, .0])
    lengths = np.array([5, 5, 6, 6, 7, 7, 8, 8])
    base = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6, 7])]
    pairs = lambda ids: [ids[i:i + 2] for i in range(0, len(ids), 2)]  # noqa: E731
    got = curriculum_batches(base, keys, lengths, pairs, window=2)
    # window 1 = samples 0-3 by key: 1 (.1), 2 (.5), 0 (.9), unseen 3; window 2: 7, 4, 6, 5;
    # seen ones cut as one stream: [1, 2] [0, 7] [4, 6] [5]; then by mean key, unseen last
    assert [b.tolist() for b in got] == [[4, 6], [1, 2], [0, 7], [5], [3]]
    assert sorted(np.concatenate(got).tolist()) == list(range(8))
    whole = curriculum_batches(base, keys, lengths, pairs, window=0)
    assert [b.tolist() for b in whole] == [[7, 1], [4, 6], [2, 5], [0], [3]]
    assert curriculum_batches([], keys, lengths, pairs, window=2) == []


def test_only_the_epoch_indices_are_ordered():
    tracker = tracker_from([[(1, 5)], [(3, 5)], [(0, 5)], [(2, 5)]])
    seen, unseen = order_of(tracker, indices=[3, 1, 0])  # sample 2 was filtered out by size
    assert sorted(seen) == [0, 1, 3] and unseen == []


def test_tracker_updates_last_row_wins_and_state_round_trips():
    t = ComplexityTracker(4)
    t.update(torch.tensor([[2, 1, 5], [0, 0, 3]]))
    t.update(torch.tensor([[2, 4, 5], [2, 2, 5]]))  # two ranks, same id: the last row wins
    assert t.seen().tolist() == [True, False, True, False]
    assert t.complexity()[2].tolist() == [pytest.approx(0.4)]
    state = t.state_dict()
    assert all(isinstance(v, (int, torch.Tensor)) for v in state.values())  # weights_only-safe
    u = ComplexityTracker()
    u.load_state_dict(state)
    assert u.digest() == t.digest() and torch.equal(u.multi, t.multi)
    assert u.resize(5) and not u.seen().any()  # another training set: forget
    with pytest.raises(ValueError, match="MoE layers"):
        t.update(torch.tensor([[1, 0, 0, 3, 3]]))


def test_sample_complexity_from_moe_stats():
    # experts_per_token is (T, B): 0 = padding, 1 = one expert, 2 = two experts
    enc = SimpleNamespace(name="encoder.0", experts_per_token=torch.tensor(
        [[0, 2], [2, 1], [1, 2]]))
    dec = SimpleNamespace(name="decoder.0", experts_per_token=torch.tensor([[1, 2], [1, 0]]))
    sample = {"id": torch.tensor([7, 3])}
    rows = sample_complexity((None, {"moe_stats": [enc, dec]}), sample)
    assert rows.tolist() == [[7, 1, 0, 2, 2], [3, 2, 1, 3, 1]]
    assert sample_complexity((None, {"moe_stats": []}), sample) is None
    t = ComplexityTracker(8)
    t.update(rows)
    assert t.complexity()[3].tolist() == [pytest.approx(2 / 3), 1.0]


def test_bucket_shuffle_keeps_steps_and_buckets():
    batches = [[i] for i in range(10)]
    out = shuffle_in_buckets(batches, bucket_steps=2, num_shards=2, seed=5)
    steps = [tuple(x[0] for x in out[i:i + 2]) for i in range(0, 10, 2)]
    assert sorted(steps) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]  # steps stay together
    assert {steps[0], steps[1]} == {(0, 1), (2, 3)} and steps[4] == (8, 9)  # within buckets
    assert out == shuffle_in_buckets(batches, 2, 2, seed=5)  # same on every rank


def test_batch_loads_count_tokens_times_experts_and_unseen_at_the_seen_mean():
    t = tracker_from([[(1, 4)], [(3, 4)], None])  # shares 0.25, 0.75; sample 2 unseen
    loads = batch_loads([[0], [1], [2], [0, 1]], [4, 4, 10], t.multi, t.tokens)
    assert loads.tolist() == [5.0, 7.0, pytest.approx(15.0), 12.0]  # unseen: mean share 0.5
    assert batch_loads([[0, 2]], [4, 4, 10]).tolist() == [14.0]  # no statistics: tokens


def test_balance_steps_pairs_alike_batches_and_keeps_the_curriculum_at_window_scale():
    rng = np.random.RandomState(0)
    n = 64
    keys = np.sort(rng.random_sample(n))  # sample i is batch i, already in curriculum order
    batches = [np.array([i]) for i in range(n)]
    loads = rng.uniform(1000, 3000, n)  # token counts unrelated to complexity, as measured
    before = step_imbalance(batches, loads, num_shards=2, update_freq=1)
    out = balance_steps(batches, loads, keys, num_shards=2, update_freq=1, window_steps=8)
    got = [int(b[0]) for b in out]
    assert sorted(got) == list(range(n))  # the same batches, each once
    for w in range(0, n, 16):  # every window of 8 updates keeps its own batches
        assert sorted(got[w:w + 16]) == list(range(w, w + 16))
        pairs = [got[w + j:w + j + 2] for j in range(0, 16, 2)]
        by_load = sorted(range(w, w + 16), key=lambda i: -loads[i])
        assert sorted(map(sorted, pairs)) == sorted(sorted(by_load[j:j + 2])
                                                    for j in range(0, 16, 2))
        means = [keys[p].mean() for p in pairs]
        assert means == sorted(means)  # updates within a window: simplest first
    after = step_imbalance(out, loads[got], 2, 1)
    assert before > 1.15 and after < 1.05, (before, after)
    assert out == balance_steps(batches, loads, keys, 2, 1, 8)  # same on every rank
    assert balance_steps(batches, loads, keys, 1, 1, 8) == batches  # one rank: nothing to do
    assert balance_steps(batches, loads, keys, 1, 4, 8) == batches  # also with --update-freq
    assert balance_steps(batches, loads, keys, 2, 1, 0) == batches  # off


def test_balance_steps_with_update_freq_deals_each_update_over_its_ranks():
    # 2 ranks x update_freq 2: an update is 4 consecutive batches, rank r gets positions r, 2 + r
    loads = np.array([10.0, 9.0, 2.0, 1.0, 8.0, 7.0, 6.0, 5.0])
    batches = [np.array([i]) for i in range(8)]
    keys = np.arange(8, dtype=np.float64)
    out = [int(b[0]) for b in balance_steps(batches, loads, keys, 2, 2, window_steps=2)]
    assert out == [0, 1, 5, 4, 6, 7, 3, 2]  # ranks: 10 + 7 = 9 + 8, then 6 + 1 = 7 + 2
    assert step_imbalance([batches[i] for i in out], loads[out], 2, 2) < \
        step_imbalance(batches, loads, 2, 2)
    # a last partial update stays as it was
    tail = [int(b[0]) for b in balance_steps(batches[:6], loads[:6], keys, 2, 2, 2)]
    assert tail[4:] == [4, 5] and sorted(tail[:4]) == [0, 1, 2, 3]
    short = balance_steps(batches[:3], loads[:3], keys, 2, 2, 2)  # less than one update
    assert [int(b[0]) for b in short] == [0, 1, 2]


def test_batch_complexity_spread():
    t = tracker_from([[(1, 4)], [(3, 4)], [(2, 4)], None])
    spread = batch_complexity_spread([[0, 1], [2, 3]], t.multi, t.tokens)
    assert spread["min"] == 0.5 and spread["max"] == 0.5 and spread["batches"] == 2
    assert spread["within_std"] == pytest.approx((0.25 + 0.0) / 2)


# ---------------------------------------------------------------------------------------------
# through fairseq


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    """600 Multi30k de-en pairs (sentencepiece 500): a few seconds per epoch on 2 cores."""
    return prepare_m30k(tmp_path_factory, 500, 600, 40)


TRAIN = [
    "--user-dir", USER_DIR, "--task", "adaptive_moe_translation", "--moe-curriculum",
    "--arch", "adaptive_moe_transformer_tiny", "--share-all-embeddings",
    "--criterion", "adaptive_moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2000", "--cpu", "--seed", "3",
    "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--no-epoch-checkpoints",
    "--disable-validation",
]
TIMING = {"wps", "ups", "wall", "train_wall", "gb_free"}
ONE_THREAD = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def train_records(text):
    return {int(r["num_updates"]): {k: v for k, v in r.items() if k not in TIMING}
            for r in (json.loads(line.split("| train_inner | ", 1)[1])
                      for line in text.splitlines() if "| train_inner | " in line)}


def curriculum_lines(text):
    return [line.split("moe curriculum | ", 1)[1] for line in text.splitlines()
            if "moe curriculum | epoch" in line]


def make_task(data, *flags):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--user-dir", USER_DIR, "--arch",
                                                "adaptive_moe_transformer_tiny", *flags])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset("train")
    return task


def epoch_batches(task, epochs=3):
    """The batches (as sorted id tuples) fairseq-train would draw, epoch by epoch."""
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=2000,
                                  max_positions=(1024, 1024), ignore_invalid_inputs=True,
                                  required_batch_size_multiple=8, seed=3, epoch=1)
    out = []
    for _ in range(epochs):
        out.append([tuple(sorted(b["id"].tolist())) for b in itr.next_epoch_itr(shuffle=True)])
    return out


def test_switch_off_and_early_epochs_keep_fairseqs_order(tiny_bin):
    fairseq_order = epoch_batches(make_task(tiny_bin, "--task", "translation"))
    assert fairseq_order[0] != fairseq_order[1]  # fairseq shuffles its batches every epoch
    assert epoch_batches(make_task(tiny_bin, "--task", "adaptive_moe_translation")) == fairseq_order
    late = make_task(tiny_bin, "--task", "adaptive_moe_translation", "--moe-curriculum",
                     "--moe-curriculum-start-epoch", "4")
    assert epoch_batches(late) == fairseq_order  # switch on, but not started: fairseq's order

    # started at epoch 2, with made-up statistics: epoch 1 is fairseq's, epoch 2 is not shuffled
    def with_statistics(*flags):
        task = make_task(tiny_bin, "--task", "adaptive_moe_translation", "--moe-curriculum", *flags)
        n = len(task.dataset("train"))
        task.complexity.resize(n)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, 20, (n, 4), generator=g)
        multi = (tokens * torch.rand(n, 4, generator=g)).long()
        task.complexity.update(torch.cat([torch.arange(n).view(-1, 1), multi, tokens], 1))
        return task

    task = with_statistics("--moe-curriculum-order", "cosine", "--moe-curriculum-window", "0")
    got = epoch_batches(task, epochs=2)
    assert got[0] == fairseq_order[0]
    dataset = task.dataset("train")
    ids = np.arange(len(dataset))
    groups = curriculum_order(ids, task.complexity.multi, task.complexity.tokens,
                              dataset.num_tokens_vec(ids))
    expected = [tuple(sorted(b)) for g_ in groups if len(g_)
                for b in dataset.batch_by_size(g_, max_tokens=2000,
                                               required_batch_size_multiple=8)]
    assert got[1] == expected  # the paper's construction: global cosine order, then cut
    # --moe-curriculum-shuffle buckets: the same batches, shuffled within buckets of 3 steps
    buckets = epoch_batches(with_statistics("--moe-curriculum-order", "cosine",
                                            "--moe-curriculum-window", "0",
                                            "--moe-curriculum-shuffle", "buckets",
                                            "--moe-curriculum-bucket-steps", "3"), epochs=2)
    assert buckets[1] == shuffle_in_buckets(expected, 3, 1, seed=3 + 2) != expected
    # with --update-freq 2, a step is the two micro-batches of one update: moved together
    task = with_statistics("--moe-curriculum-order", "cosine", "--moe-curriculum-window", "0",
                           "--moe-curriculum-shuffle", "buckets",
                           "--moe-curriculum-bucket-steps", "3", "--update-freq", "2")
    assert epoch_batches(task, epochs=2)[1] == shuffle_in_buckets(expected, 3, 2, seed=3 + 2)

    # the default: mean order, window 1: fairseq's own batches, ordered by their mean key
    task = with_statistics()
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=2000,
                                  max_positions=(1024, 1024), ignore_invalid_inputs=True,
                                  required_batch_size_multiple=8, seed=3, epoch=1)
    got = [[tuple(sorted(b["id"].tolist())) for b in itr.next_epoch_itr(shuffle=True)]
           for _ in range(2)]
    assert got[0] == fairseq_order[0]
    base = itr.batch_sampler.base_batches(dataset, 1)
    keys = sample_keys(ids, task.complexity.multi, task.complexity.tokens, order="mean")
    expected = curriculum_batches(
        base, keys, dataset.num_tokens_vec(ids),
        lambda g_: dataset.batch_by_size(g_, max_tokens=2000, required_batch_size_multiple=8), 1)
    assert got[1] == [tuple(sorted(b.tolist())) for b in expected]
    assert sorted(got[1]) == sorted(tuple(sorted(b.tolist())) for b in base)  # fairseq's batches
    means = [keys[list(b)].mean() for b in got[1]]
    assert means == sorted(means)  # simplest batches first
    # --moe-curriculum-window 4: re-cut within windows of 4 of fairseq's batches
    task = with_statistics("--moe-curriculum-window", "4")
    got = epoch_batches(task, epochs=2)[1]
    expected = curriculum_batches(
        base, keys, dataset.num_tokens_vec(ids),
        lambda g_: dataset.batch_by_size(g_, max_tokens=2000, required_batch_size_multiple=8), 4)
    assert got == [tuple(sorted(b.tolist())) for b in expected]


def test_balanced_steps_through_the_sampler_on_two_shards(tiny_bin):
    """--moe-curriculum-balance-steps: the default order's batches, re-paired into updates of
    similar MoE work per rank, sharded as fairseq shards them."""
    def run(*flags):
        task = make_task(tiny_bin, "--task", "adaptive_moe_translation", "--moe-curriculum",
                         *flags)
        dataset = task.dataset("train")
        n = len(dataset)
        task.complexity.resize(n)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, 20, (n, 4), generator=g)
        multi = (tokens * torch.rand(n, 4, generator=g)).long()
        task.complexity.update(torch.cat([torch.arange(n).view(-1, 1), multi, tokens], 1))
        shards = []
        for shard_id in (0, 1):
            itr = task.get_batch_iterator(dataset, max_tokens=2000, max_positions=(1024, 1024),
                                          ignore_invalid_inputs=True,
                                          required_batch_size_multiple=8, seed=3, epoch=1,
                                          num_shards=2, shard_id=shard_id,
                                          disable_iterator_cache=True)
            for _ in range(2):
                epoch = [tuple(sorted(b["id"].tolist())) for b in itr.next_epoch_itr()
                         if b]  # fairseq pads the last shard with an empty batch
            shards.append(epoch)
        return task, dataset, itr.frozen_batches, shards

    task, dataset, plain, _ = run("--moe-curriculum-balance-steps", "0")
    _, _, balanced, shards = run("--moe-curriculum-balance-steps", "4")
    work = np.asarray(dataset.src_sizes) + np.asarray(dataset.tgt_sizes)
    loads = batch_loads(plain, work, task.complexity.multi, task.complexity.tokens)
    keys = sample_keys(np.arange(len(dataset)), task.complexity.multi, task.complexity.tokens)
    expected = balance_steps(plain, loads, keys, num_shards=2, update_freq=1, window_steps=4)
    assert [tuple(b) for b in balanced] == [tuple(b) for b in expected]
    assert sorted(map(tuple, balanced)) == sorted(map(tuple, plain))  # the same batches
    assert shards[0] == [tuple(sorted(b)) for b in balanced[0::2]]  # fairseq's sharding
    assert shards[1] == [tuple(sorted(b)) for b in balanced[1::2]]
    after = batch_loads(balanced, work, task.complexity.multi, task.complexity.tokens)
    assert step_imbalance(balanced, after, 2, 1) < step_imbalance(plain, loads, 2, 1)


def test_windowed_batches_match_fairseqs_count_and_size(m30k_bin):
    """On 3,000 Multi30k pairs with random complexities (the worst case: unrelated to length),
    window 1 (the default) keeps fairseq's batches exactly; windows of 4 of fairseq's batches
    re-cut by complexity give fairseq's batch count and padded tokens within 8%, and batches
    twice as alike in complexity as fairseq's; the global cut (window 0) needs many more
    batches."""
    task = make_task(m30k_bin, "--task", "adaptive_moe_translation", "--moe-curriculum")
    dataset = task.dataset("train")
    n = len(dataset)
    ids = np.arange(n)
    g = torch.Generator().manual_seed(1)
    tokens = torch.from_numpy(dataset.num_tokens_vec(ids)).view(-1, 1).repeat(1, 4).long()
    multi = (tokens * torch.rand(n, 4, generator=g)).long()
    task.complexity.resize(n)
    task.complexity.update(torch.cat([torch.arange(n).view(-1, 1), multi, tokens], 1))
    limits = dict(max_tokens=2048, required_batch_size_multiple=8)
    with torch.random.fork_rng():
        order = dataset.ordered_indices()
    base = dataset.batch_by_size(order, **limits)
    keys = sample_keys(ids, multi, tokens, order="mean")
    lengths = dataset.num_tokens_vec(ids)

    def padded_tokens(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    same = curriculum_batches(base, keys, lengths, lambda g_: [], 1)
    assert sorted(map(tuple, same)) == sorted(map(tuple, base))
    for window, within in ((4, 0.08), (0, None)):
        got = curriculum_batches(base, keys, lengths,
                                 lambda g_: dataset.batch_by_size(g_, **limits), window)
        assert sorted(np.concatenate(got).tolist()) == sorted(np.concatenate(base).tolist())
        ratio = len(got) / len(base)
        if within is not None:
            assert abs(ratio - 1) <= within, (len(got), len(base))
            assert padded_tokens(got) / padded_tokens(base) <= 1 + within
            spread = batch_complexity_spread(got, multi, tokens)["within_std"]
            assert spread < 0.6 * batch_complexity_spread(base, multi, tokens)["within_std"]
        else:
            assert ratio > 1.2, (len(got), len(base))  # lengths mixed: more, padded batches


SPY = r"""
import hashlib, json, sys
import numpy as np
import torch.distributed as dist

root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)  # this checkout's plugin, the one --user-dir names
from fairseq_cli.train import cli_main  # first: it sets up fairseq's log format
from fairseq_adaptive_moe.tasks import adaptive_moe_translation as t, curriculum as c

def write(record):
    with open(f"{out}/rank{dist.get_rank()}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")

order = c.CurriculumBatchSampler.__call__
def spy_order(self, dataset, epoch):
    batches = order(self, dataset, epoch)
    write({"epoch": epoch, "tracker": self.tracker.digest(),
           "batches": [sorted(np.asarray(b).tolist()) for b in batches]})
    return batches
c.CurriculumBatchSampler.__call__ = spy_order

step = t.AdaptiveMoETranslationTask.train_step
def spy_step(self, sample, *args, ignore_grad=False, **kwargs):
    write({"step": None if ignore_grad else sorted(sample["id"].tolist())})
    return step(self, sample, *args, ignore_grad=ignore_grad, **kwargs)
t.AdaptiveMoETranslationTask.train_step = spy_step

sys.argv = ["fairseq-train"] + sys.argv[3:]
cli_main()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_gloo_ranks_compute_the_same_order(tiny_bin, tmp_path):
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(spy), str(ROOT), str(tmp_path), str(tiny_bin), *TRAIN,
         "--save-dir", str(tmp_path / "ckpt"), "--max-epoch", "2",
         "--distributed-world-size", "2", "--distributed-rank", str(rank),
         "--distributed-init-method", init, "--distributed-no-spawn",
         "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"],
        env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]

    records = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)]
    orders = [[r for r in recs if "batches" in r] for recs in records]
    steps = [[r["step"] for r in recs if "step" in r] for recs in records]
    assert [o["epoch"] for o in orders[0]] == [1, 2]
    assert orders[0] == orders[1]  # same statistics (digest) and same batches on both ranks
    assert "active, ordered by complexity" in curriculum_lines(logs[0])[-1]
    assert "seen 600/600" in curriculum_lines(logs[0])[-1]  # each rank saw half, merged
    # the ranks' MoE work per update, busiest over mean, in fairseq's own log records
    imbalance = [float(r["moe_rank_imbalance"]) for r in train_records(logs[0]).values()]
    assert imbalance and all(1.0 <= x <= 2.0 for x in imbalance)  # 2.0: one rank idle
    assert sum(imbalance) / len(imbalance) < 1.5

    # sharded after ordering: at step k of epoch 2, rank r trains batch 2k + r of the order
    first, second = orders[0][0]["batches"], orders[0][1]["batches"]
    per_rank = (len(first) + 1) // 2
    for rank in (0, 1):
        epoch2 = steps[rank][per_rank:per_rank + (len(second) + 1) // 2]
        expected = second[rank::2] + [None] * ((len(second) + 1) // 2 - len(second[rank::2]))
        assert epoch2 == expected


def test_resume_mid_curriculum_epoch_matches_uninterrupted_run(tiny_bin, tmp_path):
    def train(save, *extra):
        # one thread: on a loaded 2-core machine, two threads per run are much slower
        proc = subprocess.run([str(BIN / "fairseq-train"), str(tiny_bin), *TRAIN, "--save-dir",
                               str(save), "--max-epoch", "2", *extra], capture_output=True,
                              text=True, timeout=600, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    whole = train(tmp_path / "a")
    records = train_records(whole)
    epochs = [int(r["epoch"]) for _, r in sorted(records.items())]
    cut = epochs.count(1) + epochs.count(2) // 2  # in the middle of the first curriculum epoch
    assert "epoch 002 | active" in curriculum_lines(whole)[-1]

    first = train(tmp_path / "b", "--max-update", str(cut))
    resumed = train(tmp_path / "b")
    assert f"(epoch 2 @ {cut} updates)" in resumed
    assert curriculum_lines(resumed) == []  # the saved order of epoch 2 is reused, not rebuilt

    both = {**train_records(first), **train_records(resumed)}
    assert sorted(both) == sorted(records)
    assert both == records  # same batches (bsz, wpb, moe_2x ...) and losses, update by update

    ckpt_a = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    assert ckpt_a["model"].keys() == ckpt_b["model"].keys()
    for name, value in ckpt_a["model"].items():
        assert torch.equal(value, ckpt_b["model"][name]), name
    # and the statistics that order the next epoch
    state_a, state_b = (c["extra_state"]["train_iterator"]["moe_curriculum"]["tracker"]
                        for c in (ckpt_a, ckpt_b))
    assert torch.equal(state_a["multi"], state_b["multi"])
    assert torch.equal(state_a["tokens"], state_b["tokens"])
    assert int((state_b["tokens"].sum(1) > 0).sum()) == 600


@pytest.mark.parametrize("flags,named", [
    (["--moe-curriculum-start-epoch", "0"], "--moe-curriculum-start-epoch"),
    (["--moe-curriculum-bucket-steps", "0"], "--moe-curriculum-bucket-steps"),
    (["--moe-curriculum-shuffle", "random"], "--moe-curriculum-shuffle"),
    (["--moe-curriculum-order", "length"], "--moe-curriculum-order"),
    (["--moe-curriculum-window", "-1"], "--moe-curriculum-window"),
    (["--moe-curriculum-balance-steps", "-2"], "--moe-curriculum-balance-steps"),
])
def test_bad_flags_fail_with_one_line(tiny_bin, tmp_path, flags, named):
    save = tmp_path / "never"
    proc = run_cli("fairseq-train", tiny_bin, *TRAIN, "--save-dir", save, "--max-update", "1",
                   *flags, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
    assert not save.exists()


def test_rank_runner_order_names_map_to_flags():
    from experiments.curriculum_ranks import order_flags

    assert order_flags("curriculum-b8") == ["--moe-curriculum", "--moe-curriculum-balance-steps",
                                            "8"]
    assert order_flags("curriculum-cosine-w4")[1:] == ["--moe-curriculum-order", "cosine",
                                                       "--moe-curriculum-window", "4"]
    assert order_flags("curriculum-x3") is None and order_flags("shuffled") is None
