"""Compile the Triton LoRA kernels ahead of time for a CUDA target, without a GPU (triton ships ptxas).

Catches what the CPU interpreter cannot: code that does not lower to GPU code (types, tl.dot shapes, shared
memory). Run in a fresh process without ``TRITON_INTERPRET`` (the test does): ``python aot_compile.py [arch]``.
"""

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lorafleet.adapters.triton_lora import BLOCKS, _blocks_r, _kernels  # noqa: E402


def jobs(dt: str, has_ranks: bool, R: int):
    """(kernel, pointer types, constexprs) for one dtype / rank mode / r_max, with the CUDA tile sizes."""
    p, rk = "*" + dt, "*i32" if has_ranks else "*i64"
    _, dk, dn = BLOCKS[("cuda", "decode")]
    pm, pk, pn = BLOCKS[("cuda", "prefill")]
    br = _blocks_r(R)
    seg = {"order_ptr": "*i32", "blk_slot_ptr": "*i32", "blk_row0_ptr": "*i32", "blk_row1_ptr": "*i32", "h_ptr": "*fp32"}
    ieee = dt == "fp32"
    return [
        ("decode_shrink", {"x_ptr": p, "a_ptr": p, "slot_ptr": "*i64", "rank_ptr": rk, "h_ptr": "*fp32"},
         dict(HAS_RANKS=has_ranks, R=R, BLOCK_R=br, BLOCK_K=dk)),
        ("decode_expand", {"y_ptr": p, "b_ptr": p, "slot_ptr": "*i64", "rank_ptr": rk, "scale_ptr": p, "h_ptr": "*fp32"},
         dict(HAS_RANKS=has_ranks, R=R, BLOCK_R=br, BLOCK_N=dn)),
        ("segment_shrink", {"x_ptr": p, "a_ptr": p, "rank_ptr": rk, "scale_ptr": p, **seg},
         dict(HAS_RANKS=has_ranks, R=R, BLOCK_M=pm, BLOCK_R=br, BLOCK_K=pk, IEEE=ieee)),
        ("segment_expand", {"y_ptr": p, "b_ptr": p, "rank_ptr": rk, **seg},
         dict(HAS_RANKS=has_ranks, R=R, BLOCK_M=pm, BLOCK_R=br, BLOCK_N=pn, IEEE=ieee)),
    ]


def main(arch: int = 90) -> int:
    kernels, target, failed = _kernels(), GPUTarget("cuda", arch, 32), 0
    for dt, has_ranks, R in (("bf16", True, 64), ("fp32", False, 8)):
        for name, types, consts in jobs(dt, has_ranks, R):
            fn = kernels[name]
            signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, signature, consts), target=target)
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                failed += 1
                print(f"FAIL {name} {dt} ranks={has_ranks} R={R}: {type(exc).__name__}: {exc}")
                continue
            print(f"ok   {name} {dt} ranks={has_ranks} R={R} sm_{arch}: {time.perf_counter() - t0:.1f}s, "
                  f"shared {compiled.metadata.shared} B")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:])))
