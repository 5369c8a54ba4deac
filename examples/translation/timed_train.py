#!/usr/bin/env python
"""Run fairseq-train in this process and time every update and every validation.

    python examples/translation/timed_train.py TIMING.jsonl [fairseq-train arguments ...]

TIMING.jsonl gets one line per update, ``{"update", "step_s", "train_wall_s"}``, and one per
validation, ``{"update", "valid_loss", "train_wall_s"}``. ``train_wall_s`` is training wall time
since the first update, with validation time left out. torch uses ``OMP_NUM_THREADS`` threads
(default 2), so runs started with the same setting are comparable. Used by ``compare.py`` and
``curriculum_table6.py``.
"""

import json
import os
import sys
import time


def main(timing_path, argv):
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import fairseq_cli.train as fairseq_train  # first: it sets up fairseq's log format
    import fairseq.trainer

    out = open(timing_path, "w", buffering=1)
    clock = {"start": None, "valid": 0.0}

    def train_wall(now):
        return now - clock["start"] - clock["valid"] if clock["start"] is not None else 0.0

    step = fairseq.trainer.Trainer.train_step

    def timed_step(self, samples, raise_oom=False):
        begin = time.perf_counter()
        if clock["start"] is None:
            clock["start"] = begin
        result = step(self, samples, raise_oom)
        end = time.perf_counter()
        out.write(json.dumps({"update": self.get_num_updates(), "step_s": end - begin,
                              "train_wall_s": train_wall(end)}) + "\n")
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
    if len(sys.argv) < 2:
        sys.exit("usage: timed_train.py TIMING.jsonl [fairseq-train arguments ...]")
    main(sys.argv[1], sys.argv[2:])
