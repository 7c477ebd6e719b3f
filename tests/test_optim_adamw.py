import pytest
import torch

from gradlora.optim.adamw import adamw_foreach_, adamw_update_


@pytest.mark.parametrize("bias_correction", [True, False])
def test_foreach_step_equals_the_one_tensor_reference(bias_correction):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32]  # bf16 parameter, fp32 moments
    ref = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    fast = [p.clone() for p in ref]
    ref_states, fast_states = [{} for _ in ref], [{} for _ in fast]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for t in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        live = [0, 1, 2] if t != 1 else [0, 2]  # parameter 1 skips a step: its own step count
        for i in live:
            adamw_update_(ref[i], grads[i], ref_states[i], bias_correction=bias_correction, **hyper)
        adamw_foreach_(
            [fast[i] for i in live],
            [grads[i] for i in live],
            [fast_states[i] for i in live],
            bias_correction=bias_correction,
            **hyper,
        )
    for a, b, sa, sb in zip(ref, fast, ref_states, fast_states, strict=True):
        assert sa["step"] == sb["step"]
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert ref_states[1]["step"] == 3 and fast[1].dtype == torch.bfloat16
