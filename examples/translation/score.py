#!/usr/bin/env python
"""Score ``fairseq-generate`` output with sacreBLEU against the raw (untokenized) references.

Hypotheses are the detokenized ``D-<id>`` lines (run fairseq-generate with
``--post-process sentencepiece``); references are the raw reference file, line ``id``. A sentence
fairseq-generate did not output counts as an empty hypothesis, so the score is always over the
whole reference set. Prints the BLEU line with sacreBLEU's signature.
"""

import argparse
import sys

import sacrebleu

from fairseq_adaptive_moe.data.prepare import read_hypotheses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generate_output", help="file with fairseq-generate's stdout")
    parser.add_argument("reference", help="raw reference text, one sentence per line")
    parser.add_argument("--json", action="store_true", help="print a JSON record instead")
    args = parser.parse_args(argv)
    for path in (args.generate_output, args.reference):
        try:
            open(path, encoding="utf-8").close()
        except OSError as e:
            print(f"score.py: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
    refs = open(args.reference, encoding="utf-8").read().splitlines()
    hyps = read_hypotheses(args.generate_output)
    if not hyps:
        print(f"score.py: no D- lines in {args.generate_output}", file=sys.stderr)
        return 2
    if max(hyps) >= len(refs):
        print(f"score.py: sentence id {max(hyps)} is past the {len(refs)} references", file=sys.stderr)
        return 2
    missing = len(refs) - len(hyps)
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score([hyps.get(i, "") for i in range(len(refs))], [refs])
    if args.json:
        import json
        print(json.dumps({"bleu": round(score.score, 2), "signature": str(bleu.get_signature()),
                          "sentences": len(refs), "missing": missing}))
    else:
        note = f" ({missing} of {len(refs)} sentences had no output and count as empty)" if missing else ""
        print(f"sacreBLEU {score.score:.2f}  {bleu.get_signature()}  [{score}]{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
