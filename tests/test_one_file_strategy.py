"""A new strategy is one file: written outside the package, installed through the entry-point
group ``lowrank_geom.strategies`` alone, and checked by the generic suites with no other edit.

The file below goes into a temporary directory next to a ``*.dist-info`` folder (``METADATA``
and ``entry_points.txt``), which is all ``importlib.metadata`` needs to see an installed
distribution on ``PYTHONPATH``. A subprocess then runs the contract tests, the optimizer tests,
the invariance-class test and the docs-page test selected by the strategy's name (``-k``): its
test ids must be collected and every selected test must pass (about a minute).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "onefile_riemannian_sgd"

STRATEGY = '''
"""Plain Riemannian SGD on the quotient manifold of rank-r pairs, as a one-file plugin."""

from lowrank_geom.geometry import compute_dtype, gram, gram_cutoff, gram_pinv, inverse_magnitude
from lowrank_geom.strategies import PairUpdate, Strategy, register
from lowrank_geom.strategies.base import check_weight_decay, right_multiply


def riemannian_gradient(grad, other, row_reduce):
    """``∇A (BᵀB)⁺``: the Riemannian gradient of the metric ``tr(BᵀB ξᵀη)`` (pseudo-inverse, so a
    zero partner gives a zero direction)."""
    g = gram(other, None, row_reduce)
    return right_multiply(grad, gram_pinv(inverse_magnitude(g, gram_cutoff(g, compute_dtype(other.dtype)))))


@register
class OneFileRiemannianSGD(Strategy):
    """Riemannian SGD: ``δA = −η (∇A (BᵀB)⁻¹ + λA)``, ``δB = −η (∇B (AᵀA)⁻¹ + λB)``.

    Under ``(A, B) → (AG, BG⁻ᵀ)`` the gradients become ``(∇A G⁻ᵀ, ∇B G)`` and the steps
    ``(δA G, δB G⁻ᵀ)``, so the trajectory of ``Z = ABᵀ`` is the same for every ``G ∈ GL(r)``.
    """

    name = "onefile_riemannian_sgd"
    invariance = "GL(r)"
    defaults = dict(weight_decay=0.0)

    def validate(self, hp):
        super().validate(hp)
        check_weight_decay(hp["weight_decay"])

    def init(self, a, b, hp):
        return {}, {}

    def row_sharding_requirements(self, hp, dtype=None):
        return []  # both Grams are summed over rows through row_reduce

    def update_batch(self, batch, hp):
        d_a = riemannian_gradient(batch.grad_a, batch.b, batch.row_reduce)
        d_b = riemannian_gradient(batch.grad_b, batch.a, batch.row_reduce)
        lr = hp["lr"]
        return PairUpdate(d_a, d_b, {}, {}, scale=-lr, decay=lr * hp["weight_decay"])
'''

ENTRY_POINTS = f"[lowrank_geom.strategies]\n{NAME} = {NAME}\n"
METADATA = f"Metadata-Version: 2.1\nName: {NAME.replace('_', '-')}\nVersion: 0.1\n"

SUITES = [
    "tests/test_optim_contract.py",
    "tests/test_optim.py",
    "tests/strategies/test_invariance_classes.py",
    "tests/test_docs.py",
]


def install(where: Path) -> None:
    """The strategy file and the distribution metadata that makes its entry point visible."""
    (where / f"{NAME}.py").write_text(textwrap.dedent(STRATEGY).lstrip())
    info = where / f"{NAME}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA)
    (info / "entry_points.txt").write_text(ENTRY_POINTS)


def test_a_strategy_in_one_file_passes_the_generic_suites(tmp_path):
    install(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    select = f"{NAME} or test_every_registered_strategy_has_a_page or test_strategy_metadata_matches"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "-k",
            select,
            *SUITES,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    passed = re.findall(r"^PASSED (\S+)", out, re.M)
    ours = [t for t in passed if NAME in t]
    # its ids in every parametrized suite, and the docs-page test that now sees its generated page
    for suite in SUITES[:3]:
        assert any(t.startswith(suite) for t in ours), f"no {NAME} test collected in {suite}:\n{out[-4000:]}"
    assert any("test_every_registered_strategy_has_a_page" in t for t in passed), out[-4000:]
    assert not re.search(r"^(FAILED|ERROR) ", out, re.M), out[-8000:]
