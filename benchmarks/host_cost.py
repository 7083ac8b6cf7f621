"""Host time of one 4-bit dequantization and one QLoRA projection call, by path (issue 20).

The matrices are tiny (64 x 128), so the device's work is negligible and the time per call is the host's:
what a step pays about 2,600 times (8B, micro-batch 2 x 4) when the GPU waits on the host. Paths:
  functional   bitsandbytes.functional.dequantize_4bit with a QuantState (the recipe before 2026-12-07, 8th session)
  operator     torch.ops.bitsandbytes.dequantize_4bit (bitsandbytes' registered operator)
  recipe       models.quant._dequantize_rows (on CUDA bitsandbytes' C entry point, elsewhere the operator)
and the whole projection (models.qlora_op, frozen product + one rank-16 adapter, no grad as in a compiled
graph's forward) with the recipe's dequantization, registered as the recipe registers it (models/operator.py)
and, for comparison, the same kernel registered through ``torch.library.custom_op`` (how the recipe
registered it before 2026-12-07, ninth session).

    python benchmarks/host_cost.py --device cuda      # prints one table (microseconds per call)
"""

from __future__ import annotations

import argparse
import time

import torch

from models import qlora_op, quant


def _time(fn, calls: int, sync) -> float:
    for _ in range(200):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def _custom_op_twin():
    """The projection's kernel registered through torch.library.custom_op, with an autograd formula as the
    recipe's (never called here: no grad), so that its call takes custom_op's autograd layers."""

    @torch.library.custom_op("host_cost::projection", mutates_args=())
    def op(
        x: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        rows: int,
        quant_type: str,
        blocksize: int,
        xd: torch.Tensor | None,
        As: list[torch.Tensor],
        Bs: list[torch.Tensor],
        scalings: list[float],
        offsets: list[int],
        tag: str,
    ) -> torch.Tensor:
        return qlora_op._kernel(x, packed, absmax, rows, quant_type, blocksize, xd, As, Bs, scalings, offsets, tag)

    op.register_fake(qlora_op._fake)
    op.register_autograd(qlora_op._backward, setup_context=qlora_op._setup_context)
    return op


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bnbF = quant.bnb_functional()
    torch.manual_seed(0)
    rows, cols, dtype = 64, 128, torch.bfloat16
    q, st = bnbF.quantize_4bit(torch.randn(rows, cols, device=dev), blocksize=64, quant_type="nf4")
    packed, absmax = q.reshape(rows, -1), st.absmax.reshape(rows, -1).float()

    def functional():
        state = bnbF.QuantState(
            absmax=absmax[:rows].reshape(-1),
            shape=torch.Size((rows, cols)),
            blocksize=64,
            quant_type="nf4",
            dtype=dtype,
        )
        return bnbF.dequantize_4bit(packed[:rows].reshape(-1, 1), state)

    def operator():
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            packed.reshape(-1, 1), absmax.reshape(-1), 64, "nf4", (rows, cols), dtype
        )

    def recipe():
        return quant._dequantize_rows(packed, absmax, rows, cols, "nf4", 64, dtype)

    assert torch.equal(functional(), recipe()) and torch.equal(operator(), recipe())
    x = torch.randn(16, cols, device=dev, dtype=dtype)
    A, B = torch.randn(16, cols, device=dev, dtype=dtype), torch.randn(rows, 16, device=dev, dtype=dtype)

    w = quant.Weight4bit(packed, absmax, torch.zeros(16, device=dev), rows, "nf4", 64, dtype)

    def projection():
        return qlora_op.lora_linear_4bit(x, w, None, [A], [B], [2.0], [0])

    via_custom_op = _custom_op_twin()

    def projection_custom_op():
        return via_custom_op(x, packed, absmax, rows, "nf4", 64, None, [A], [B], [2.0], [0], "")

    print(f"host time per call on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), us")
    print("| path | us per call |\n| --- | --- |")
    with torch.no_grad():
        assert torch.equal(projection(), projection_custom_op())
        paths = {
            "functional": functional,
            "operator": operator,
            "recipe": recipe,
            "projection": projection,
            "projection (custom_op)": projection_custom_op,
        }
        for name, fn in paths.items():
            print(f"| {name} | {_time(fn, a.calls, sync):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
