"""The whole training step of the seed AlexNet per provider (see conftest.py for shapes/dtype)."""
import pytest

from alexnet_fast import bench_step


@pytest.mark.parametrize("provider", bench_step.STEP_PROVIDERS)
def test_train_step(benchmark, synced, or_skip, provider, layout, dtype, device, shape):
    if provider in bench_step.COMPILED and device != "cuda":
        pytest.skip("torch.compile of the whole model runs on a GPU only here (compile time)")
    batch, size = shape
    step = or_skip(bench_step.prepare_step, provider, layout, batch, dtype, size, device)
    benchmark.group = f"train step B{batch} {dtype}"
    benchmark.extra_info.update(batch=batch, warmup_s=step.warmup_s)
    benchmark(synced(step.fn))
