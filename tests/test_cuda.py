"""Every strategy on CUDA equals the same steps on CPU (skipped without a GPU).

Same pairs, same gradients, the optimizer built once per device. Float64: the two devices run
different LAPACK/cuSOLVER and BLAS routes, round-off ~1e-15 per operation on these
well-conditioned problems, so 1e-10 over 10 steps (as in the reference tests) leaves wide margin
while any device-dependent algorithm difference shows at ≥ 1e-4. Float32: ~1e-7 per step, 1e-4
over 10 steps. bf16 parameters keep float32 state on CUDA as on CPU.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_geom import LowRankOptimizer
from tests.test_optim import IDS, STRATEGIES, loss_of, make_pairs, make_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 10


def _trajectory(info, device, dtype, compile_=False):
    pairs = [
        (a.detach().to(device).requires_grad_(), b.detach().to(device).requires_grad_())
        for a, b in make_pairs(dtype=dtype, shapes=((33, 17, 4), (33, 17, 4), (20, 9, 2)))
    ]
    targets = [t.to(device) for t in make_targets(pairs)]
    opt = LowRankOptimizer(pairs, strategy=info.name, lr=info.lr, compile=compile_)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(pairs, targets).backward()
        opt.step()
    return [t.detach().cpu() for p in pairs for t in p], opt


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_cuda_steps_equal_cpu_steps(info, dtype, rtol, atol):
    cpu, _ = _trajectory(info, "cpu", dtype)
    gpu, opt = _trajectory(info, "cuda", dtype)
    for x, y in zip(cpu, gpu):
        torch.testing.assert_close(y, x, rtol=rtol, atol=atol)
    for state in opt.state.values():
        assert all(v.device.type == "cuda" for v in state.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("info", STRATEGIES, ids=IDS)
def test_cuda_bf16_parameters_keep_float32_state(info):
    _, opt = _trajectory(info, "cuda", torch.bfloat16)
    for p, state in opt.state.items():
        assert p.dtype == torch.bfloat16
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32, (info.name, k, v.dtype)
                assert torch.isfinite(v).all()


def test_cuda_compiled_lora_rite_equals_eager():
    info = STRATEGIES[IDS.index("lora_rite")]
    eager, _ = _trajectory(info, "cuda", torch.float32)
    compiled, _ = _trajectory(info, "cuda", torch.float32, compile_=True)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
