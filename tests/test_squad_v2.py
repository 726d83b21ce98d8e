"""The offline SQuAD v2 scorer against cases worked out by hand from the official rules."""
from __future__ import annotations

import pytest

from sparselab.evaluate.squad_v2 import (abstain_unanswerable, compute_exact, compute_f1,
                                         normalize_answer, score, squad_v2_scores)


@pytest.mark.parametrize("text, normalised", [
    ("The  Quick, brown fox!", "quick brown fox"),     # lower, punctuation, article, spaces
    ("An apple a day", "apple day"),                    # every article goes
    ("Theatre and anthem", "theatre and anthem"),       # ...but only as whole words
    ("U.S.A.", "usa"),                                  # punctuation goes before articles
    ("a-the", "athe"),                                  # so "a-the" becomes one word
    ("\tDenver\n Broncos ", "denver broncos"),
    ("", ""),
])
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_after_normalisation():
    assert compute_exact("Denver Broncos", "the denver broncos.") == 1
    assert compute_exact("Denver Broncos", "Broncos") == 0


@pytest.mark.parametrize("gold, prediction, f1", [
    ("Denver Broncos", "Broncos", 2 / 3),               # p = 1/1, r = 1/2
    # gold [cat sat on mat], prediction [cat on hat]: 2 shared, p = 2/3, r = 2/4 -> 4/7
    ("the cat sat on the mat", "cat on a hat", 4 / 7),
    # repeated tokens count as often as both have them: gold [x y y], pred [y y y z]
    # -> 2 shared, p = 2/4, r = 2/3 -> 4/7
    ("x y y", "y y y z", 4 / 7),
    ("Paris", "London", 0.0),
    ("Paris", "", 0.0),                                 # empty prediction on an answerable one
    ("", "", 1.0),                                      # both no-answer
    ("", "anything", 0.0),
])
def test_token_f1(gold, prediction, f1):
    assert compute_f1(gold, prediction) == pytest.approx(f1)


def test_maximum_over_gold_answers():
    assert score(["Denver Broncos", "Broncos", "the Denver Broncos"], "Broncos") == (1, 1.0)
    # vs "Paris": 0; vs "city of Paris" [city of paris]: p = 1/1, r = 1/3 -> 0.5
    exact, f1 = score(["Paris", "city of Paris"], "the city")
    assert exact == 0 and f1 == pytest.approx(0.5)


def test_unanswerable_questions():
    assert score([], "") == (1, 1.0)                     # abstaining is right
    assert score([], "Paris") == (0, 0.0)                # any answer is wrong
    assert score([], "unanswerable") == (0, 0.0)         # the raw word is an answer...
    assert score([], abstain_unanswerable(" Unanswerable.")) == (1, 1.0)  # ...mapped it abstains
    assert abstain_unanswerable("not unanswerable") == "not unanswerable"
    # gold answers that normalise to nothing are dropped; none left = only "" is gold
    assert score(["the"], "") == (1, 1.0)
    assert score(["the"], "mat") == (0, 0.0)


def test_corpus_scores_and_splits():
    references = {"q1": ["Denver Broncos"], "q2": ["Paris", "city of Paris"], "q3": [], "q4": []}
    predictions = {"q1": "denver broncos", "q2": "the city", "q3": "", "q4": "x"}
    scores = squad_v2_scores(predictions, references)
    # EM: 1, 0, 1, 0 -> 50%; F1: 1, .5, 1, 0 -> 62.5%
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(62.5)
    assert scores["total"] == 4
    assert scores["HasAns_exact"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(75.0)
    assert scores["HasAns_total"] == 2
    assert scores["NoAns_exact"] == pytest.approx(50.0)
    assert scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["NoAns_total"] == 2
    assert "best_exact" not in scores  # only with no-answer probabilities


def test_no_answer_probabilities_threshold_and_best():
    references = {"q1": ["Denver Broncos"], "q2": ["Paris", "city of Paris"], "q3": [], "q4": []}
    predictions = {"q1": "denver broncos", "q2": "the city", "q3": "", "q4": "x"}
    na_probs = {"q1": 0.1, "q2": 0.2, "q3": 0.9, "q4": 0.8}
    # Sweep in order q1 q2 q4 q3, starting from "abstain on all" = 2 right (the NoAns ones):
    # EM: +1 (3, at .1), +0, -1 (q4 answered wrongly), +0 -> best 3/4 at .1
    # F1: +1 (3, at .1), +.5 (3.5, at .2), -1, +0 -> best 3.5/4 at .2
    scores = squad_v2_scores(predictions, references, na_probs=na_probs)
    assert scores["best_exact"] == pytest.approx(75.0)
    assert scores["best_exact_thresh"] == pytest.approx(0.1)
    assert scores["best_f1"] == pytest.approx(87.5)
    assert scores["best_f1_thresh"] == pytest.approx(0.2)
    # the default threshold 1.0 never applies: the raw scores stand
    assert scores["exact"] == pytest.approx(50.0)
    # at 0.5, q3 and q4 count as abstentions (both right): EM 1,0,1,1; F1 1,.5,1,1
    at_half = squad_v2_scores(predictions, references, na_probs=na_probs, na_prob_thresh=0.5)
    assert at_half["exact"] == pytest.approx(75.0)
    assert at_half["f1"] == pytest.approx(87.5)


def test_splits_only_where_there_are_questions():
    scores = squad_v2_scores({"q1": "Broncos"}, {"q1": ["Denver Broncos"]})
    assert scores["exact"] == 0.0 and scores["f1"] == pytest.approx(200 / 3)
    assert "HasAns_exact" in scores and "NoAns_exact" not in scores


def test_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="no prediction"):
        squad_v2_scores({}, {"q1": []})
