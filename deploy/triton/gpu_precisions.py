"""A GEMM in bf16, fp8 (e4m3) and int8 on this host's GPU, against an fp32 reference.

Part of gpu_check.sh: it shows the GPU runs the precisions the catalog gates on
it (fp8 from compute capability 8.9), at what rate and error. These are
PyTorch's kernels, not TensorRT-LLM's: torch._int_mm in particular is no
measure of TensorRT-LLM's int8 kernels. Nothing here bills or serves.
"""

import torch

N = 4096  # a square GEMM large enough to fill the GPU
REPS = 20


def timed(gemm) -> tuple[float, float]:
    """Milliseconds per call and tera-operations per second, after three warm-ups."""
    for _ in range(3):
        gemm()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        gemm()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / REPS
    return ms, 2 * N**3 / (ms / 1e3) / 1e12


def main() -> None:
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    print(
        f"torch {torch.__version__}: {props.name}, compute capability "
        f"{props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB"
    )
    torch.manual_seed(0)
    a = torch.randn(N, N, device=device, dtype=torch.bfloat16)
    b = torch.randn(N, N, device=device, dtype=torch.bfloat16)
    reference = a.float() @ b.float()

    def error(product: torch.Tensor) -> float:
        return ((product.float() - reference).norm() / reference.norm()).item()

    # fp8: one scale per tensor, as TensorRT-LLM's fp8 per-tensor recipe.
    scale_a = a.abs().max().float() / 448.0  # e4m3's largest finite value
    scale_b = b.abs().max().float() / 448.0
    a8 = (a.float() / scale_a).to(torch.float8_e4m3fn)
    b8 = (b.float() / scale_b).to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
    # int8: one scale per row of a, per column of b (SmoothQuant's per-token/per-channel).
    row_a = a.abs().amax(dim=1, keepdim=True).float() / 127
    col_b = b.abs().amax(dim=0, keepdim=True).float() / 127
    a_i8 = (a.float() / row_a).round().to(torch.int8)
    b_i8 = (b.float() / col_b).round().to(torch.int8)

    gemms = {
        "bf16": (lambda: a @ b, lambda product: product),
        "fp8 e4m3": (
            lambda: torch._scaled_mm(
                a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
            ),
            lambda product: product,
        ),
        "int8": (
            lambda: torch._int_mm(a_i8, b_i8),
            lambda product: product.float() * row_a * col_b,
        ),
    }
    for name, (gemm, dequantize) in gemms.items():
        try:
            ms, rate = timed(gemm)
            print(
                f"{name:>8} GEMM {N}^3: {ms:.3f} ms, {rate:,.0f} T(FL)OP/s, "
                f"relative error {error(dequantize(gemm())):.1e}"
            )
        except (RuntimeError, NotImplementedError) as exc:  # a precision this GPU lacks
            print(f"{name:>8} GEMM: not run here: {exc}")


if __name__ == "__main__":
    main()
