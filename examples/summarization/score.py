#!/usr/bin/env python
"""Score ``fairseq-generate`` summaries with ROUGE-1/2/L (Google's ``rouge-score`` package).

Hypotheses are the detokenized ``D-<id>`` lines of fairseq-generate's output (run it with
``--post-process sentencepiece``, or ``--bpe gpt2 ...`` for BART's BPE); references are the raw
summaries, line ``id`` of the reference file (``DATA_BIN/raw/test.target``). An article with no
output counts as an empty summary, so the score is always over every reference.

Scores are F1 x 100 with Porter stemming, aggregated with rouge-score's bootstrap (1,000
resamples, fixed seed): the mid value and its 95% interval. ``rougeLsum`` is ROUGE-L over
sentences (the CNN/DM convention), with sentences split after ``.``, ``!`` or ``?``; ``rougeL``
treats each summary as one sequence.
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

from fairseq_adaptive_moe.data.prepare import read_hypotheses

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rouge(hypotheses, references, seed=1):
    """{metric: {"mid", "low", "high"}} (F1 x 100) over aligned lists of strings."""
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for hyp, ref in zip(hypotheses, references):
        lines = lambda text: "\n".join(s for s in SENTENCE_END.split(text.strip()) if s)
        aggregator.add_scores(scorer.score(lines(ref), lines(hyp)))
    state = np.random.get_state(), random.getstate()
    np.random.seed(seed)  # the bootstrap draws from numpy's global generator
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    return {m: {k: round(100 * getattr(result[m], k).fmeasure, 2) for k in ("mid", "low", "high")}
            for m in METRICS}


def package_version():
    try:
        from importlib.metadata import version
        return version("rouge-score")
    except Exception:  # noqa: BLE001
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generate_output", help="file with fairseq-generate's stdout")
    parser.add_argument("reference", help="raw reference summaries, one per line")
    parser.add_argument("--json", action="store_true", help="print a JSON record instead")
    args = parser.parse_args(argv)
    try:
        refs = Path(args.reference).read_text(encoding="utf-8").splitlines()
        hyps = read_hypotheses(args.generate_output)
    except OSError as e:
        print(f"score.py: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    problem = (f"no D- lines in {args.generate_output}" if not hyps else
               f"article id {max(hyps)} is past the {len(refs)} references"
               if max(hyps) >= len(refs) else None)
    if problem:
        print(f"score.py: {problem}", file=sys.stderr)
        return 2
    scores = rouge([hyps.get(i, "") for i in range(len(refs))], refs)
    missing = len(refs) - len(hyps)
    if args.json:
        print(json.dumps({**{m: scores[m]["mid"] for m in METRICS}, "interval95": scores,
                          "articles": len(refs), "missing": missing,
                          "rouge_score": package_version(), "stemmer": True}))
    else:
        note = f"; {missing} of {len(refs)} articles had no output (empty)" if missing else ""
        print("  ".join(f"{m.replace('rouge', 'ROUGE-')} {scores[m]['mid']:.2f} "
                        f"[{scores[m]['low']:.2f}, {scores[m]['high']:.2f}]" for m in METRICS)
              + f"  (F1 x 100, rouge-score {package_version()}, Porter stemmer, 95% bootstrap "
              f"interval, {len(refs)} articles{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
