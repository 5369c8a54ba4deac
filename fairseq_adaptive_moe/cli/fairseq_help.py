"""Show this plugin's flags in ``fairseq-train --user-dir fairseq_adaptive_moe --help``.

fairseq answers ``--help`` at its first parsing pass, before any model or criterion has added its
flags, so no model's flags appear there. When the plugin is imported by a fairseq command that
was asked for help, it prints its own option groups, generated from the same dataclasses that
define the flags, after fairseq's help.
"""

import argparse
import atexit
import os
import sys


def moe_help_text() -> str:
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from ..criterions.adaptive_moe_cross_entropy import MoELossConfig
    from ..models.adaptive_moe_bart import MoEBARTConfig
    from ..models.config import MoEConfig
    from ..tasks.curriculum import MoECurriculumConfig

    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    model = parser.add_argument_group(
        "fairseq_adaptive_moe model options (--arch adaptive_moe_*, also --model-overrides)")
    gen_parser_from_dataclass(model, MoEConfig())
    bart = parser.add_argument_group("fairseq_adaptive_moe BART options (--arch adaptive_moe_bart*)")
    gen_parser_from_dataclass(bart, MoEBARTConfig())
    criterion = parser.add_argument_group(
        "fairseq_adaptive_moe criterion options (--criterion adaptive_moe_*)")
    gen_parser_from_dataclass(criterion, MoELossConfig())
    task = parser.add_argument_group(
        "fairseq_adaptive_moe task options (--task adaptive_moe_translation, "
        "adaptive_moe_language_modeling)")
    gen_parser_from_dataclass(task, MoECurriculumConfig())
    return parser.format_help()


def _print_after_fairseq_help() -> None:
    sys.stdout.write("\n" + moe_help_text())
    sys.stdout.flush()


def register_if_help_requested(argv=None) -> None:
    argv = sys.argv if argv is None else argv
    if os.path.basename(argv[0]).startswith("fairseq-") and ("-h" in argv or "--help" in argv):
        atexit.register(_print_after_fairseq_help)
