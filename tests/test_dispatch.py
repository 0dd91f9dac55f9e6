"""Which fused restorer gets the next batch (`choose_actor`): the one that should answer first."""

from __future__ import annotations

from collections import Counter

from pipeline.deblur.ray.workers import choose_actor


def test_actors_not_yet_heard_from_are_tried_first_in_turn() -> None:
    assert choose_actor(3, 0, Counter(), {}) == 0
    assert choose_actor(3, 2, Counter(), {}) == 2  # ties in turn from `turn`
    assert choose_actor(3, 0, Counter(), {0: 0.1, 1: 0.1}) == 2  # actor 2: not heard from yet


def test_a_slow_actor_gets_a_batch_only_once_the_fast_ones_queue_up() -> None:
    answer_s = {0: 0.1, 1: 0.3}  # actor 1 answers 3x slower
    assert choose_actor(2, 1, Counter(), answer_s) == 0  # not in turn: by expected answer
    assert choose_actor(2, 1, Counter({0: 1}), answer_s) == 0  # 2 x 0.1 < 1 x 0.3
    assert choose_actor(2, 0, Counter({0: 2}), answer_s) == 1  # 3 x 0.1 is no less than 1 x 0.3
    assert choose_actor(2, 0, Counter({0: 3}), answer_s) == 1
    # Batches handed out one after another with nothing answered: 3 of 4 go to the fast actor.
    busy: Counter[int] = Counter()
    for turn in range(8):
        busy[choose_actor(2, turn, busy, answer_s)] += 1
    assert busy == Counter({0: 6, 1: 2})
