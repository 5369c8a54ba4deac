#!/usr/bin/env python
"""Run fairseq-train in this process and time every update and every validation.

    python -m experiments.timed_train [--moe-timing] TIMING.jsonl [fairseq-train arguments ...]

TIMING.jsonl gets one line per update, ``{"update", "step_s", "train_wall_s", "words"}``
(``words``: target tokens in the update's batches on this rank, fairseq's ``wps`` numerator), and
one per validation, ``{"update", "valid_loss", "train_wall_s"}``. With ``--moe-timing`` each
update line also has ``moe_fwd_ms`` and ``moe_bwd_ms``, the time inside the MoE layers, and
``dense_ffn_fwd_ms`` and ``dense_ffn_bwd_ms``, inside dense FFN sublayers (fc1 ... fc2)
(``fairseq_adaptive_moe.moe.MoETimer``; on CUDA it syncs once per update to read its events). ``train_wall_s`` is training wall time
since the first update, with validation time left out. Under ``torchrun -m
experiments.timed_train`` rank 0 writes TIMING.jsonl and rank r > 0 TIMING.jsonl.rank<r>. torch uses ``OMP_NUM_THREADS`` threads
(default 2), so runs started with the same setting are comparable. Used by
``experiments.compare``, ``experiments.throughput`` and ``experiments.curriculum_table6``.
"""

import json
import os
import sys
import time


def main(timing_path, argv, moe_timing=False):
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import fairseq_cli.train as fairseq_train  # first: it sets up fairseq's log format
    import fairseq.trainer

    timer = None
    if moe_timing:
        from fairseq_adaptive_moe.moe import MoETimer
        timer = MoETimer().__enter__()

    rank = int(os.environ.get("RANK", "0"))  # under torchrun: every rank times its own steps
    out = open(timing_path if rank == 0 else f"{timing_path}.rank{rank}", "w", buffering=1)
    clock = {"start": None, "valid": 0.0}

    def train_wall(now):
        return now - clock["start"] - clock["valid"] if clock["start"] is not None else 0.0

    step = fairseq.trainer.Trainer.train_step

    def timed_step(self, samples, raise_oom=False):
        begin = time.perf_counter()
        if clock["start"] is None:
            clock["start"] = begin
        result = step(self, samples, raise_oom)
        record = {}
        if timer is not None:
            kinds = timer.collect_by_kind()
            record["moe_fwd_ms"], record["moe_bwd_ms"] = kinds["moe"]
            record["dense_ffn_fwd_ms"], record["dense_ffn_bwd_ms"] = kinds["dense_ffn"]
        end = time.perf_counter()
        words = sum(int(s["ntokens"]) for s in samples if s and "ntokens" in s)
        out.write(json.dumps({"update": self.get_num_updates(), "step_s": end - begin,
                              "train_wall_s": train_wall(end), "words": words, **record}) + "\n")
        return result

    validate = fairseq_train.validate

    def timed_validate(cfg, trainer, *rest, **kwargs):
        begin = time.perf_counter()
        losses = validate(cfg, trainer, *rest, **kwargs)
        out.write(json.dumps({"update": trainer.get_num_updates(), "valid_loss": losses[0],
                              "train_wall_s": train_wall(begin)}) + "\n")
        clock["valid"] += time.perf_counter() - begin
        return losses

    fairseq.trainer.Trainer.train_step = timed_step
    fairseq_train.validate = timed_validate
    sys.argv = ["fairseq-train"] + list(argv)
    fairseq_train.cli_main()


if __name__ == "__main__":
    args = sys.argv[1:]
    moe_timing = bool(args) and args[0] == "--moe-timing"
    args = args[1:] if moe_timing else args
    if not args:
        sys.exit("usage: python -m experiments.timed_train [--moe-timing] TIMING.jsonl "
                 "[fairseq-train arguments ...]")
    main(args[0], args[1:], moe_timing)
