"""SQuAD 2.0 scoring by the rules of the official evaluation script (v2.0), without `evaluate`.

lm-eval's `squadv2` task scores through `evaluate.load("squad_v2")`, which fetches the metric from
the hub and so fails offline. This module reimplements the official rules:

- answers are normalised: lower case, punctuation removed, the articles a/an/the removed,
  whitespace collapsed;
- exact match (EM) is 1 when the normalised strings are equal; F1 is the harmonic mean of token
  precision and recall over the normalised, whitespace-split tokens (a shared token counts as often
  as it appears in both);
- a question's score is the maximum over its gold answers; gold answers that normalise to nothing
  are dropped, and a question without gold answers is unanswerable: its only gold answer is the
  empty string, so only an empty prediction scores 1 (EM and F1);
- corpus scores are percentages (0-100), overall and split into `HasAns_*` (questions with gold
  answers) and `NoAns_*` (without), each split present only where it has questions;
- with no-answer probabilities, `best_exact` / `best_f1` are the scores at the best abstention
  threshold (predictions with a higher no-answer probability count as abstentions).
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)

# lm-eval's squadv2 few-shot target for an unanswerable question; the model says it to abstain.
UNANSWERABLE = "unanswerable"

# The scores of lm-eval's `squadv2`: per question (averaged) under its rule, then the variant that
# counts "unanswerable" as an abstention; the best-threshold sweeps are corpus-level.
QUESTION_METRICS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1",
                    "exact_abstain", "f1_abstain", "NoAns_exact_abstain", "NoAns_f1_abstain")
CORPUS_METRICS = ("best_exact", "best_f1")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def get_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    gold_toks, pred_toks = get_tokens(gold), get_tokens(prediction)
    if not gold_toks or not pred_toks:
        # either is no-answer: F1 is 1 when both are, else 0
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """The gold answers that count: those not normalising to nothing; [""] when none do."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def score(answers: Sequence[str], prediction: str) -> tuple[int, float]:
    """(EM, F1) of one prediction against a question's gold answers (empty = unanswerable)."""
    golds = gold_answers(answers)
    return (max(compute_exact(g, prediction) for g in golds),
            max(compute_f1(g, prediction) for g in golds))


def abstain_unanswerable(prediction: str) -> str:
    """Map the generation "unanswerable" (as lm-eval's prompt teaches it) to the empty answer.

    The official rules only credit an empty prediction on an unanswerable question, while lm-eval's
    `squadv2` asks the model to say "unanswerable"; without this mapping a correct abstention
    scores 0. Any generation that normalises to "unanswerable" ("Unanswerable.", " unanswerable")
    counts as the empty answer.
    """
    return "" if normalize_answer(prediction) == UNANSWERABLE else prediction


def _total(scores: Mapping[str, float], ids: Iterable[str]) -> tuple[float, int]:
    ids = list(ids)
    return (100.0 * sum(scores[i] for i in ids) / len(ids) if ids else 0.0), len(ids)


def best_threshold(predictions: Mapping[str, str], scores: Mapping[str, float],
                   na_probs: Mapping[str, float],
                   has_answer: Mapping[str, bool]) -> tuple[float, float]:
    """(best score in %, its threshold): abstain on questions above the threshold (official)."""
    current = best = sum(1 for q in scores if not has_answer[q])
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        current += diff
        if current > best:
            best, threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_v2_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    na_probs: Mapping[str, float] | None = None,
                    na_prob_thresh: float = 1.0) -> dict[str, float]:
    """Corpus scores of the official script, in percent.

    predictions: question id -> predicted text ("" = abstain).
    references: question id -> gold answer texts (empty = unanswerable).
    na_probs: question id -> probability that the question has no answer (optional); a prediction
        whose probability exceeds `na_prob_thresh` counts as an abstention.
    """
    if not references:
        raise ValueError("no questions to score")
    missing = [q for q in references if q not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    has_answer = {q: bool(answers) for q, answers in references.items()}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, answers in references.items():
        exact_raw[qid], f1_raw[qid] = score(answers, predictions[qid])
    exact, f1 = dict(exact_raw), dict(f1_raw)
    if na_probs is not None:
        for qid in references:
            if na_probs[qid] > na_prob_thresh:
                exact[qid] = f1[qid] = float(not has_answer[qid])
    out: dict[str, float] = {}
    out["exact"], total = _total(exact, references)
    out["f1"], _ = _total(f1, references)
    out["total"] = float(total)
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [q for q in references if has_answer[q] is wanted]
        if ids:
            out[f"{prefix}_exact"], n = _total(exact, ids)
            out[f"{prefix}_f1"], _ = _total(f1, ids)
            out[f"{prefix}_total"] = float(n)
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = best_threshold(
            predictions, exact_raw, na_probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(
            predictions, f1_raw, na_probs, has_answer)
    return out
