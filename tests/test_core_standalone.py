"""The plain-PyTorch core stands alone; the plugin still registers itself through ``--user-dir``.

``fairseq_adaptive_moe.moe`` must import and train where ``import fairseq`` fails, and the
package registers its models, criterions and tasks only when fairseq imports.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOE_DIR = ROOT / "fairseq_adaptive_moe" / "moe"

# Run in a fresh interpreter: a meta-path finder makes every import of fairseq fail first.
CORE_WITHOUT_FAIRSEQ = r"""
import importlib.abc
import json
import sys


class NoFairseq(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fairseq", "fairseq_cli"):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, NoFairseq())
try:
    import fairseq  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the fairseq blocker did not work")

import torch

from fairseq_adaptive_moe.moe import ExpertFFN, MoELayer, TopKGate

torch.manual_seed(0)
layer = MoELayer(TopKGate(16, 4, policy="adaptive", threshold=0.2), ExpertFFN(4, 16, 32, seed=0))
x = torch.randn(7, 3, 16, requires_grad=True)  # T x B x C
pad = torch.zeros(7, 3, dtype=torch.bool)  # the input's leading shape, True = pad
pad[-2:, 0] = True
y, stats = layer(x, pad)
loss = y.square().sum() + 0.01 * stats.balance_loss + 0.001 * stats.z_loss
loss.backward()

grads = {name: p.grad for name, p in layer.named_parameters()}
grads["input"] = x.grad
print(json.dumps({
    "shape": list(y.shape),
    "tokens": int(stats.num_tokens),
    "multi": int(stats.num_multi),
    "grads": {name: [g is not None and bool(torch.isfinite(g).all()),
                     g is not None and float(g.abs().sum()) > 0] for name, g in grads.items()},
    "pad_output_zero": bool((y[-2:, 0] == 0).all()),
    "fairseq_modules": sorted(m for m in sys.modules
                              if m.split(".")[0] in ("fairseq", "fairseq_cli") and sys.modules[m]),
}))
"""


def run_python(code: str, cwd=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env():
    import os

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_moe_layer_trains_where_fairseq_cannot_be_imported():
    out = run_python(CORE_WITHOUT_FAIRSEQ)
    assert out["fairseq_modules"] == []
    assert out["shape"] == [7, 3, 16]
    assert out["tokens"] == 7 * 3 - 2
    assert out["multi"] > 0  # adaptive gating gave some tokens two experts
    assert out["pad_output_zero"]
    assert set(out["grads"]) == {"gate.wg.weight", "experts.fc1_weight", "experts.fc1_bias",
                                 "experts.fc2_weight", "experts.fc2_bias", "input"}
    for name, (finite, nonzero) in out["grads"].items():
        assert finite and nonzero, name


def module_imports(path: Path):
    """(line, absolute module name) of every import in a file, relative ones resolved; for
    ``from X import name`` both X and X.name (which may be a module)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def module_file(name: str):
    """The file of a module of this repository, or None (not ours, or not a module)."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_nothing_moe_imports_imports_fairseq():
    """Static check of every import under moe/, and of the plugin modules they import (e.g. a
    plain error module), lazy ones inside functions included; the package ``__init__`` imports
    fairseq only when it can (the subprocess test above)."""
    todo, seen = sorted(MOE_DIR.glob("*.py")), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for line, name in module_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            assert name.split(".")[0] not in ("fairseq", "fairseq_cli"), f"{where} imports {name}"
            if name.startswith("fairseq_adaptive_moe.") and module_file(name) is not None:
                todo.append(module_file(name))


REGISTRATION = r"""
import json
import sys
from argparse import Namespace

from fairseq import utils
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
from fairseq.tasks import TASK_REGISTRY

assert "fairseq_adaptive_moe" not in sys.modules
utils.import_user_module(Namespace(user_dir=sys.argv[1]))  # what --user-dir does
print(json.dumps({"archs": sorted(ARCH_MODEL_REGISTRY), "models": sorted(MODEL_REGISTRY),
                  "criterions": sorted(CRITERION_REGISTRY), "tasks": sorted(TASK_REGISTRY)}))
"""


def test_user_dir_registers_models_criterions_and_tasks(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", REGISTRATION, str(ROOT / "fairseq_adaptive_moe")], cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
        env=dict(_env(), PYTHONPATH=""),  # found through the user dir alone, from any directory
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch in ("adaptive_moe_transformer", "adaptive_moe_transformer_tiny",
                 "adaptive_moe_transformer_lm_tiny", "adaptive_moe_bart_tiny"):
        assert arch in out["archs"], arch
    for model in ("adaptive_moe_transformer", "adaptive_moe_transformer_lm", "adaptive_moe_bart"):
        assert model in out["models"], model
    for criterion in ("adaptive_moe_label_smoothed_cross_entropy", "adaptive_moe_cross_entropy"):
        assert criterion in out["criterions"], criterion
    assert "adaptive_moe_translation" in out["tasks"]
