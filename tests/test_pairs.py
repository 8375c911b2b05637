"""Tests of irpo.pairs: wrap-around pairing, the three data policies, stats and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from irpo.pairs import DataStats, NoTrainingData, build_examples, wraparound_pairs


def rec(rid: str, correct: list[str] = (), wrong: list[str] = (), gold: str | None = None) -> dict:
    samples = [{"text": t, "correct": True} for t in correct]
    samples += [{"text": t, "correct": False} for t in wrong]
    return {"id": rid, "prompt": f"Q {rid}", "gold_cot": gold, "samples": samples}


def build(records, data="pairs", k=5, add_gold=False, max_examples=None, seed=0):
    return build_examples(
        records, data, k, add_gold_to_winners=add_gold, max_examples=max_examples, seed=seed
    )


# ------------------------------------------------------------- wraparound_pairs


def test_wraparound_exact_sequence():
    # i = 0..4: winners[i % 2], losers[i % 3]
    assert wraparound_pairs(["w0", "w1"], ["l0", "l1", "l2"], 5) == [
        ("w0", "l0"),
        ("w1", "l1"),
        ("w0", "l2"),
        ("w1", "l0"),
        ("w0", "l1"),
    ]


def test_wraparound_covers_every_combination_when_lengths_are_coprime():
    # 2 and 3 are coprime, so i -> (i % 2, i % 3) hits all 6 combinations in 6 steps.
    pairs = wraparound_pairs(["w0", "w1"], ["l0", "l1", "l2"], 6)
    assert len(set(pairs)) == 6


def W(*idx: int) -> list[str]:
    return [f"w{i}" for i in idx]


def test_wraparound_takes_distinct_pairs_while_there_are_some():
    """5 winners x 5 losers, K = 10: the paper's walk gives (wi, li) for i = 0..4, then
    (w0, l0) again; it is taken, so the losers move on by one: (w0, l1), (w1, l2), ...
    (hand-derived; the plain walk would repeat the first 5 pairs)."""
    ws, ls = [f"w{i}" for i in range(5)], [f"l{i}" for i in range(5)]
    want = [("w0", "l0"), ("w1", "l1"), ("w2", "l2"), ("w3", "l3"), ("w4", "l4"),
            ("w0", "l1"), ("w1", "l2"), ("w2", "l3"), ("w3", "l4"), ("w4", "l0")]
    got = wraparound_pairs(ws, ls, 10)
    assert got == want and len(set(got)) == 10


def test_wraparound_skips_within_a_later_round_too():
    """3 winners x 6 losers (lcm 6), K = 12: six paper pairs, then (w0, l0) is taken and the
    shift of one stays for the rest: (w0, l1), (w1, l2), (w2, l3), (w0, l4), (w1, l5), (w2, l0)."""
    got = wraparound_pairs(W(0, 1, 2), [f"l{i}" for i in range(6)], 12)
    assert got == [("w0", "l0"), ("w1", "l1"), ("w2", "l2"), ("w0", "l3"), ("w1", "l4"),
                   ("w2", "l5"), ("w0", "l1"), ("w1", "l2"), ("w2", "l3"), ("w0", "l4"),
                   ("w1", "l5"), ("w2", "l0")]


def test_wraparound_repeats_only_beyond_every_combination():
    """2 x 4 = 8 combinations: K = 8 takes each once (walk, then shift at i = 4); K = 11
    repeats the sequence from its start for pairs 9-11."""
    first8 = [("w0", "l0"), ("w1", "l1"), ("w0", "l2"), ("w1", "l3"),
              ("w0", "l1"), ("w1", "l2"), ("w0", "l3"), ("w1", "l0")]
    ls = [f"l{i}" for i in range(4)]
    assert wraparound_pairs(W(0, 1), ls, 8) == first8
    assert wraparound_pairs(W(0, 1), ls, 11) == first8 + first8[:3]
    assert wraparound_pairs(["w0"], ["l0"], 3) == [("w0", "l0")] * 3  # one combination only
    for n_w in range(1, 6):  # any sizes: min(K, W x L) distinct, every winner used in turn
        for n_l in range(1, 6):
            for k in range(1, 2 * n_w * n_l + 2):
                got = wraparound_pairs(W(*range(n_w)), [f"l{i}" for i in range(n_l)], k)
                assert len(got) == k and len(set(got)) == min(k, n_w * n_l), (n_w, n_l, k)
                assert [w for w, _ in got] == [f"w{i % n_w}" for i in range(k)]


def test_wraparound_short_k_and_empty_lists():
    assert wraparound_pairs(["w0", "w1", "w2"], ["l0", "l1"], 1) == [("w0", "l0")]
    assert wraparound_pairs(["w0"], ["l0"], 0) == []
    assert wraparound_pairs([], ["l0"], 3) == []
    assert wraparound_pairs(["w0"], [], 3) == []
    with pytest.raises(ValueError, match="k=-1"):
        wraparound_pairs(["w0"], ["l0"], -1)


# ----------------------------------------------------------------- data="pairs"


def test_pairs_use_each_winner_and_loser_the_wraparound_number_of_times():
    examples, stats = build([rec("a", ["c0", "c1"], ["x0", "x1", "x2"])], k=5)
    assert len(examples) == 5
    assert all(set(e) == {"id", "prompt", "chosen", "rejected"} for e in examples)
    assert all(e["id"] == "a" and e["prompt"] == "Q a" for e in examples)
    # 5 pairs over 2 winners: one used 3 times, the other 2; over 3 losers: 2, 2, 1.
    chosen = Counter(e["chosen"] for e in examples)
    rejected = Counter(e["rejected"] for e in examples)
    assert set(chosen) == {"c0", "c1"} and sorted(chosen.values()) == [2, 3]
    assert set(rejected) == {"x0", "x1", "x2"} and sorted(rejected.values()) == [1, 2, 2]
    assert stats == DataStats(prompts=1, used_prompts=1, examples=5)


def test_pairs_remove_duplicate_samples():
    # Without deduplication winners [a, a, b] would give a 3 times and b once in 4 pairs.
    examples, _ = build([rec("r", ["a", "a", "b"], ["x", "x"])], k=4)
    assert Counter(e["chosen"] for e in examples) == {"a": 2, "b": 2}
    assert Counter(e["rejected"] for e in examples) == {"x": 4}


def test_pairs_are_shuffled_not_sampler_order():
    # k=1 takes the first winner after the shuffle; over 20 seeds it cannot always be c0.
    record = rec("r", [f"c{i}" for i in range(5)], ["x"])
    firsts = {build([record], k=1, seed=s)[0][0]["chosen"] for s in range(20)}
    assert len(firsts) > 1


def test_prompts_without_both_a_winner_and_a_loser_are_skipped_and_counted():
    records = [
        rec("ok", ["c"], ["x"]),
        rec("only_w1", ["c"]),
        rec("only_w2", ["c", "d"]),
        rec("only_l", [], ["x", "y"]),
        rec("empty"),
        {"id": "no_key", "prompt": "Q", "gold_cot": None},  # no "samples" at all
    ]
    examples, stats = build(records, k=3)
    assert {e["id"] for e in examples} == {"ok"}
    assert all(e["chosen"] == "c" and e["rejected"] == "x" for e in examples)
    assert stats.as_dict() == {
        "prompts": 6,
        "used_prompts": 1,
        "examples": 3,
        "only_winners": 2,
        "only_losers": 1,
        "no_samples": 2,
    }


def test_gold_cot_is_first_winner_only_when_configured():
    record = rec("r", ["a"], ["x", "y"], gold="G")
    with_gold, _ = build([record], k=2, add_gold=True)
    # winners [G, a], losers shuffled [x, y] in some order: pairs (G, l0), (a, l1)
    assert [e["chosen"] for e in with_gold] == ["G", "a"]
    assert {e["rejected"] for e in with_gold} == {"x", "y"}
    without, _ = build([record], k=2, add_gold=False)
    assert [e["chosen"] for e in without] == ["a", "a"]


def test_gold_cot_rescues_prompts_with_only_losers_and_is_not_duplicated():
    records = [rec("lost", [], ["x"], gold="G"), rec("dup", ["G", "b"], ["y"], gold="G")]
    examples, stats = build(records, k=2, add_gold=True)
    assert [(e["id"], e["chosen"]) for e in examples] == [
        ("lost", "G"), ("lost", "G"), ("dup", "G"), ("dup", "b")
    ]  # fmt: skip
    assert stats.only_losers == 0 and stats.used_prompts == 2


def test_add_gold_without_gold_cot_names_the_record():
    with pytest.raises(ValueError, match="'r7'.*add_gold_to_winners"):
        build([rec("r7", ["a"], ["x"])], add_gold=True)


# ------------------------------------------------------- data="correct" / "gold"


def test_correct_takes_up_to_k_distinct_correct_samples():
    records = [
        rec("many", ["a", "b", "b", "c", "d"], ["x"]),
        rec("few", ["a", "a"]),
        rec("wrong", [], ["x"]),
        rec("empty"),
    ]
    examples, stats = build(records, data="correct", k=3, add_gold=True)  # gold ignored
    assert all(set(e) == {"id", "prompt", "chosen"} for e in examples)
    many = [e["chosen"] for e in examples if e["id"] == "many"]
    assert len(many) == 3 and len(set(many)) == 3 and set(many) <= {"a", "b", "c", "d"}
    assert [e["chosen"] for e in examples if e["id"] == "few"] == ["a"]
    assert stats == DataStats(prompts=4, used_prompts=2, examples=4, only_losers=1, no_samples=1)


def test_gold_gives_one_example_per_prompt():
    records = [rec("a", ["s"], ["x"], gold="GA"), rec("b", gold="GB")]
    examples, stats = build(records, data="gold", k=10)
    assert examples == [
        {"id": "a", "prompt": "Q a", "chosen": "GA"},
        {"id": "b", "prompt": "Q b", "chosen": "GB"},
    ]
    assert stats == DataStats(prompts=2, used_prompts=2, examples=2)
    with pytest.raises(ValueError, match="'c'.*data=gold"):
        build(records + [rec("c")], data="gold")


# ------------------------------------------------------------ determinism, cap


def _many_records(n: int = 12) -> list[dict]:
    return [rec(f"p{i}", [f"c{i}.{j}" for j in range(4)], [f"x{i}.{j}" for j in range(3)])
            for i in range(n)]  # fmt: skip


def test_same_seed_same_output_different_seed_different_output():
    records = _many_records()
    first, second = build(records, seed=3), build(records, seed=3)
    assert first == second
    assert build(records, seed=4)[0] != first[0]
    # Records are processed in order: ids appear grouped in input order.
    assert [e["id"] for e in first[0]] == [f"p{i}" for i in range(12) for _ in range(5)]


def test_a_prompts_examples_do_not_depend_on_other_prompts():
    records = _many_records(3)
    alone, _ = build(records[2:], seed=1)
    together, _ = build(records, seed=1)
    assert [e for e in together if e["id"] == "p2"] == alone


def test_output_is_independent_of_pythonhashseed():
    code = (
        "import json, sys; from irpo.pairs import build_examples; "
        "r = json.loads(sys.argv[1]); "
        "print(json.dumps(build_examples(r, 'pairs', 5, add_gold_to_winners=False, "
        "max_examples=20, seed=0)[0]))"
    )
    arg = json.dumps(_many_records())
    outs = set()
    for hashseed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        result = subprocess.run(
            [sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, check=True
        )
        outs.add(result.stdout)
    assert len(outs) == 1


def test_cap_is_a_seeded_order_preserving_subsample():
    records = _many_records()  # 12 prompts x 5 pairs = 60 examples
    full, _ = build(records, seed=0)
    capped, stats = build(records, max_examples=7, seed=0)
    assert len(capped) == 7 and stats.examples == 7
    # A subsequence of the uncapped output (same relative order).
    positions = [full.index(e) for e in capped]
    assert positions == sorted(positions) and len(set(positions)) == 7
    assert stats.used_prompts == len({e["id"] for e in capped})
    assert build(records, max_examples=7, seed=0)[0] == capped
    assert build(records, max_examples=7, seed=1)[0] != build(records, max_examples=7, seed=0)[0]
    # A cap at or above the total changes nothing.
    assert build(records, max_examples=60, seed=0)[0] == full


def test_bad_arguments_raise():
    records = _many_records(1)
    with pytest.raises(ValueError, match="data='sft'"):
        build(records, data="sft")
    with pytest.raises(ValueError, match="k=0"):
        build(records, k=0)
    with pytest.raises(ValueError, match="max_examples=0"):
        build(records, max_examples=0)


# -------------------------------------------------------------- NoTrainingData


def test_no_training_data_message_gives_counts_and_remedies():
    records = [rec("w1", ["a"]), rec("w2", ["b"]), rec("l", [], ["x"]), rec("e")]
    with pytest.raises(NoTrainingData) as info:
        build(records)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "data=pairs" in message and "4 prompts" in message
    assert "2 had only correct samples" in message
    assert "1 had only incorrect samples" in message
    assert "1 had no samples" in message
    for remedy in ("samples_per_prompt", "temperature", "add_gold_to_winners", "stronger"):
        assert remedy in message


def test_no_training_data_for_star_and_for_no_records():
    with pytest.raises(NoTrainingData, match="1 had only incorrect samples.*1 had no samples"):
        build([rec("l", [], ["x"]), rec("e")], data="correct")
    with pytest.raises(NoTrainingData, match="no labelled prompts"):
        build([], data="gold")


def test_pool_examples_keeps_pairs_and_dedupes_winners():
    from irpo.pairs import pool_examples

    it1 = [{"id": "a", "prompt": "P", "chosen": "w1", "rejected": "l1"},
           {"id": "a", "prompt": "P", "chosen": "w2", "rejected": "l2"}]
    it2 = [{"id": "a", "prompt": "P", "chosen": "w1", "rejected": "l3"},
           {"id": "b", "prompt": "Q", "chosen": "w1", "rejected": "l1"}]
    assert pool_examples([it1, it2], "pairs", max_examples=None, seed=0) == it1 + it2
    winners = pool_examples([it1, it2], "correct", max_examples=None, seed=0)
    assert winners == [{"id": "a", "prompt": "P", "chosen": "w1"},
                       {"id": "a", "prompt": "P", "chosen": "w2"},
                       {"id": "b", "prompt": "Q", "chosen": "w1"}]
    capped = pool_examples([it1, it2], "pairs", max_examples=2, seed=0)
    assert len(capped) == 2 and capped == pool_examples([it1, it2], "pairs", max_examples=2, seed=0)
    assert all(c in it1 + it2 for c in capped)
    with pytest.raises(ValueError, match="only pairs or correct"):
        pool_examples([it1], "gold", max_examples=None, seed=0)
    with pytest.raises(ValueError, match="no rejected"):
        pool_examples([[{"id": "x", "prompt": "P", "chosen": "w"}]], "pairs", max_examples=None, seed=0)


# ------------------------------------------------------- sampler log-probs (references)


def test_sampler_logprobs_follow_their_responses():
    """Each pair carries the sampler's log-prob of its own chosen and rejected text (the gold
    CoT too, when a sample has its text: the same token ids); a sample the sampler gave none
    for gets null."""
    from irpo.pairs import REF_KEYS

    record = rec("r", ["a", "b", "G"], ["x", "y", "z"], gold="G")
    logp = {"a": -1.5, "b": -2.5, "G": -9.0, "x": -3.5, "y": -4.5}  # z: cut at max_new_tokens
    for s in record["samples"]:
        if s["text"] in logp:
            s["logprob"] = logp[s["text"]]
    plain = {k: v for k, v in record.items() if k != "samples"}
    plain["samples"] = [{k: v for k, v in s.items() if k != "logprob"} for s in record["samples"]]
    examples, stats = build([record], k=5, add_gold=True)
    without, _ = build([plain], k=5, add_gold=True)
    # Same pairs, same order, same stats: the log-probs only ride along.
    assert [(e["chosen"], e["rejected"]) for e in examples] == \
           [(e["chosen"], e["rejected"]) for e in without]
    assert all(set(e) == {"id", "prompt", "chosen", "rejected"} for e in without)
    assert [e["chosen"] for e in examples] == ["G", examples[1]["chosen"], examples[2]["chosen"], "G",
                                               examples[1]["chosen"]]
    for e in examples:
        assert e[REF_KEYS[0]] == logp[e["chosen"]]
    for e in examples:
        assert e[REF_KEYS[1]] == logp.get(e["rejected"])
    assert {e["rejected"] for e in examples} == {"x", "y", "z"}  # so one is None
    assert build([record], k=5, add_gold=True) == (examples, stats)


def test_gold_cot_takes_its_scored_logprob_or_none():
    """The gold CoT, never sampled, carries the record's ``gold_logprob`` (the sampler scored
    it, irpo.driver.stage_sample) and null without one; sampled winners keep their own."""
    record = rec("g", ["a"], ["x"], gold="G")
    record["samples"][0]["logprob"], record["samples"][1]["logprob"] = -1.0, -3.0
    examples, _ = build([record], k=2, add_gold=True)
    assert [(e["chosen"], e["chosen_ref_logprob"], e["rejected_ref_logprob"]) for e in examples] == \
           [("G", None, -3.0), ("a", -1.0, -3.0)]
    examples, _ = build([{**record, "gold_logprob": -7.25}], k=2, add_gold=True)
    assert [(e["chosen"], e["chosen_ref_logprob"]) for e in examples] == [("G", -7.25), ("a", -1.0)]


def test_duplicate_samples_take_the_first_known_logprob():
    record = rec("d", ["a", "a"], ["x"])
    record["samples"][1]["logprob"] = -2.0  # the first "a" came without one
    record["samples"][2]["logprob"] = -3.0
    examples, _ = build([record], k=2)
    assert [(e["chosen_ref_logprob"], e["rejected_ref_logprob"]) for e in examples] == [(-2.0, -3.0)] * 2


def test_pooling_drops_sampler_logprobs():
    """Pooled training starts from one model: the other iterations' samplers are no reference."""
    from irpo.pairs import pool_examples

    it1 = [{"id": "a", "prompt": "P", "chosen": "w", "rejected": "l",
            "chosen_ref_logprob": -1.0, "rejected_ref_logprob": None}]
    assert pool_examples([it1], "pairs", max_examples=None, seed=0) == [
        {"id": "a", "prompt": "P", "chosen": "w", "rejected": "l"}]
