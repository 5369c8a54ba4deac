"""The fairseq methods this plugin copies are pinned to the fairseq the set-up installs.

When the installed fairseq is the pinned one, each copied upstream method's source must hash to
its pinned value; otherwise the check fails with one line naming the method to re-sync. Each copy
must differ from its upstream only in lines marked ``# MoE:``.
"""

import ast
import difflib
import inspect
import textwrap

import pytest

from fairseq_adaptive_moe.models import upstream

MARK = "# MoE:"


def test_pinned_fairseq_methods_are_unchanged():
    if not upstream.is_pinned_fairseq():
        dist, version = upstream.installed_fairseq()
        pytest.skip(f"fairseq copies are pinned to {upstream.PINNED_DISTRIBUTION} "
                    f"{upstream.PINNED_VERSION}; installed: {dist} {version}")
    message = upstream.check_copies()
    if message is not None:
        pytest.fail(message, pytrace=False)


def test_pin_check_names_the_changed_method_in_one_line():
    name = "fairseq.modules.transformer_layer:TransformerDecoderLayerBase.forward"

    source = upstream.upstream_source(name)
    assert "need_attn = True" in source
    edited = source.replace("need_attn = True", "need_attn = False")  # one upstream edit

    message = upstream.check_copies(lambda _: edited, pinned={name: upstream.PINNED_SHA256[name]})
    assert message is not None and "\n" not in message
    assert name in message and "MoETransformerDecoderLayer.forward" in message

    fake = {"fake.module:Layer.forward": upstream.source_sha256("def forward(self):\n    return 1\n")}
    assert upstream.check_copies(lambda _: "def forward(self):\n    return 1   \n\n", fake) is None
    message = upstream.check_copies(lambda _: "def forward(self):\n    return 2\n", fake)
    assert "fake.module:Layer.forward" in message and "\n" not in message


def test_every_copy_is_listed_and_every_pin_has_copies():
    assert set(upstream.COPIES) == set(upstream.PINNED_SHA256)
    for name, copies in upstream.COPIES.items():
        for copy in copies:
            upstream.resolve(copy)  # exists
        assert len(upstream.PINNED_SHA256[name]) == 64


def code_lines(func):
    """The source lines of a function without its docstring, dedented, trailing space removed."""
    source = textwrap.dedent(inspect.getsource(func))
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        del lines[first.lineno - 1:first.end_lineno]
    return [line.rstrip() for line in lines]


def unmarked_changes(upstream_lines, copy_lines):
    """Lines where the copy differs from upstream without a ``# MoE:`` mark: changed or added
    lines must carry it; removed upstream code must have a marked line where it was."""
    problems = []
    matcher = difflib.SequenceMatcher(a=upstream_lines, b=copy_lines, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        added = [line for line in copy_lines[j1:j2] if line.strip()]
        problems += [f"+ {line}" for line in added if MARK not in line]
        removed = [line for line in upstream_lines[i1:i2]
                   if line.strip() and not line.strip().startswith("#")]
        if removed and not added:
            nearby = copy_lines[max(j1 - 1, 0):j1 + 1]
            if not any(MARK in line for line in nearby):
                problems += [f"- {line}" for line in removed]
    return problems


WHOLE_COPIES = [  # copies of a whole method (the others hold a part of one)
    ("fairseq.models.transformer.transformer_encoder:TransformerEncoderBase.forward_scriptable",
     "fairseq_adaptive_moe.models.adaptive_moe_transformer:"
     "AdaptiveMoETransformerEncoder.forward_scriptable"),
    ("fairseq.models.transformer.transformer_decoder:TransformerDecoderBase.extract_features_scriptable",
     "fairseq_adaptive_moe.models.adaptive_moe_transformer:"
     "AdaptiveMoETransformerDecoder.extract_features_scriptable"),
    ("fairseq.modules.transformer_layer:TransformerEncoderLayerBase.forward",
     "fairseq_adaptive_moe.models.layers:MoETransformerEncoderLayer.forward"),
    ("fairseq.modules.transformer_layer:TransformerDecoderLayerBase.forward",
     "fairseq_adaptive_moe.models.layers:MoETransformerDecoderLayer.forward"),
    ("fairseq.models.transformer.transformer_base:TransformerModelBase.forward",
     "fairseq_adaptive_moe.models.adaptive_moe_transformer:AdaptiveMoETransformerModel.forward"),
    ("fairseq.models.transformer_lm:TransformerLanguageModel.build_model",
     "fairseq_adaptive_moe.models.adaptive_moe_transformer_lm:"
     "AdaptiveMoETransformerLanguageModel.build_model"),
]


@pytest.mark.parametrize("name,copy", WHOLE_COPIES, ids=[c.rsplit(":", 1)[1] for _, c in WHOLE_COPIES])
def test_copies_differ_from_upstream_only_in_marked_lines(name, copy):
    if not upstream.is_pinned_fairseq():
        pytest.skip(f"compared with {upstream.PINNED_DISTRIBUTION} {upstream.PINNED_VERSION} only")
    assert copy in upstream.COPIES[name]
    problems = unmarked_changes(code_lines(upstream.resolve(name)), code_lines(upstream.resolve(copy)))
    assert not problems, f"{copy} differs from {name} in unmarked lines:\n" + "\n".join(problems)


def test_unmarked_change_is_found():
    up = ["def f(x):", "    y = x + 1", "    z = y * 2", "    return z"]
    assert unmarked_changes(up, up) == []
    assert unmarked_changes(up, ["def f(x):", "    y = x + 2", "    z = y * 2", "    return z"]) \
        == ["+     y = x + 2"]
    assert unmarked_changes(up, ["def f(x):", "    y = x + 2  # MoE:", "    z = y * 2",
                                 "    return z"]) == []
    assert unmarked_changes(up, ["def f(x):", "    y = x + 1", "    return z"]) == ["-     z = y * 2"]
    assert unmarked_changes(up, ["def f(x):", "    y = x + 1", "    # MoE: no z", "    return z"]) == []
