"""Every op at its AlexNet layer shape, per provider and mode (see conftest.py for shapes/dtype)."""
import pytest

from alexnet_fast import bench_ops, roofline


@pytest.mark.parametrize("mode", roofline.MODES)
@pytest.mark.parametrize("provider", bench_ops.OP_PROVIDERS)
def test_op(benchmark, synced, or_skip, op_case, provider, mode, layout, dtype, device):
    if not bench_ops.applicable(op_case, provider, mode):
        pytest.skip(f"{provider} does not run {op_case.op} {mode}")
    if provider == "compile" and (device != "cuda" or mode != "fwd+bwd"):
        pytest.skip("torch.compile per op runs forward+backward on a GPU only (compile time)")
    op_bench = bench_ops.OpBench(op_case, dtype, layout, device)
    prepared = or_skip(op_bench.prepare, provider, mode)
    assert prepared.check["status"] == "ok", f"{provider}: {prepared.check['note']}"
    work = op_case.work(dtype)[mode]
    benchmark.group = f"{op_case.kernel} {op_case.shape_str} {dtype} {layout} {mode}"
    benchmark.extra_info.update(min_bytes=work.bytes, flops=work.flops, rel_err=prepared.check["rel_err"])
    benchmark(synced(prepared.plain()))
