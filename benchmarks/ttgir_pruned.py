"""Compile the fast sweep (``kernels.pruned.pruned_attn``, prefill) for a Hopper GPU on a machine
without one, and print where its loads, copies, waits and tensor-core products sit in Triton's GPU IR:
which loads the software pipeliner turned into asynchronous copies, what runs before the main loop,
and, from Triton's bundled ptxas, the registers and shared memory per program and so how many
programs fit on a multiprocessor. ``python benchmarks/ttgir_pruned.py [--d 128] [--n 8192]``.

The kernel is specialized as Triton specializes it on the device for the benchmark's inputs (bf16,
B = 1, H = 2048 / D, N queries and keys, no mask): pointers 16-byte aligned, integers equal to 1
made constants, integers divisible by 16 marked so; tiles, warps and stages from
``entropy_attn.pruned``; launched early (``PDL``, as on Hopper); ``--causal`` under a causal mask. Triton's bundled ptxas compiles
it; nothing runs. Used to read the pipelining of the sweep before spending GPU time
(``benchmarks/RESULTS.md``, issue 5).
"""
import argparse
import math
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from entropy_attn import pruned
from entropy_attn.kernels.pruned import pruned_attn

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Idx": "*i32", "Count": "*i32", "Miss": "*i32",
            "Iota": "*i32", "Thr": "*fp32", "Lse2": "*fp32", "Opart": "*fp32", "Mpart": "*fp32", "Lpart": "*fp32",
            "Lall": "*fp32", "Kept": "*fp32", "Kcnt": "*i32", "Mask": "*bf16", "Kpm": "*bf16", "Kp": "*bf16",
            "Ko": "*bf16", "Kbias": "*fp32", "Kobias": "*fp32"}
#: The IR operations listed, by the start of their text after the result name.
SHOWN = ("scf.for", "scf.if", "tt.load", "ttg.async_copy_global_to_local", "ttg.async_wait", "ttng.warp_group_dot ",
         "ttng.warp_group_dot_wait", "tt.store", "tt.dot ")


def specialization(n: int, d: int, causal: bool = False):
    """``(signature, constants, attrs)`` of ``pruned_attn`` for the fast sweep of one benchmark input."""
    h, nkb = 2048 // d, pruned.cdiv(n, 64)
    cfg = pruned._config(n, d, d)
    sweep = pruned._sweep_config(cfg, d, d, n)
    ints = dict(H=h, GROUPS=1, Nq=n, Nk=n, NQB=pruned.cdiv(n, cfg.block_m), NKB=nkb,
                stride_mb=0, stride_mh=0, stride_mm=0, stride_mn=0, stride_pb=0, stride_pn=0,
                stride_pkb=h * nkb * d, stride_pkh=nkb * d, stride_pkn=d, stride_pkd=1, stride_bb=0, stride_bn=1)
    for p, rows in (("q", "m"), ("k", "n"), ("v", "n"), ("o", "m")):
        ints.update({f"stride_{p}b": h * n * d, f"stride_{p}h": n * d, f"stride_{p}{rows}": d, f"stride_{p}d": 1})
    constants = dict(D=d, DV=d, LIST_M=cfg.block_m, BLOCK_M=sweep.block_m, BLOCK_N=cfg.block_n, BLOCK_D=d, BLOCK_DV=d,
                     CAUSAL=causal, MASK_KIND=0, KPM_KIND=0, MASKED=causal or n % cfg.block_n != 0, EXACT=False, FIXED=True,
                     SPLIT=False, FALLBACK=True, STATS=False, LSE_BOUND=True, CHECK=True, CHUNK=pruned._bound_chunk(nkb),
                     TMA=False, PRECISION="tf32", PDL=True)
    signature, attrs = {}, {}
    for i, name in enumerate(pruned_attn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "tau"):
            signature[name] = "fp32"
        elif ints[name] == 1:
            constants[name] = 1
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs, sweep


#: Hopper's registers and shared memory per multiprocessor (bytes; 1 KiB of it reserved per program).
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024


def registers(ptx: str, arch: int) -> tuple[int, str]:
    """``(registers per thread, ptxas's spill line)`` of the kernel in ``ptx``."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([get_ptxas(arch).path, "-v", f"-arch=sm_{arch}a", f.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True).stderr
    spills = next((line.strip() for line in info.splitlines() if "spill" in line), "")
    return int(re.search(r"Used (\d+) registers", info).group(1)), spills


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=128, choices=(64, 128), help="head dim")
    parser.add_argument("--n", type=int, default=8192, help="queries and keys")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--causal", action="store_true", help="under a causal mask")
    parser.add_argument("--dump", help="also write the whole IR to this file")
    args = parser.parse_args()
    signature, constants, attrs, sweep = specialization(args.n, args.d, args.causal)
    src = ASTSource(fn=pruned_attn, signature=signature, constexprs=constants, attrs=attrs)
    binary = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                            options=dict(num_warps=sweep.num_warps, num_stages=sweep.num_stages, maxnreg=sweep.maxnreg,
                                         launch_pdl=True))
    ir = binary.asm["ttgir"]
    regs, spills = registers(binary.asm["ptx"], args.arch)
    # Registers are allocated per warp in units of 256; shared memory per program plus 1 KiB.
    by_regs = REGISTERS_PER_SM // (math.ceil(regs * 32 / 256) * 256 * sweep.num_warps)
    by_shared = SHARED_PER_SM // (binary.metadata.shared + 1024)
    print(f"pruned_attn, fast sweep, N={args.n} D={args.d}{' causal' if args.causal else ''}: {sweep.block_m} rows x {sweep.num_warps} warps x "
          f"{sweep.num_stages} stages; {regs} registers per thread ({spills}), {binary.metadata.shared} bytes of "
          f"shared memory: {min(by_regs, by_shared)} programs per multiprocessor ({by_regs} by registers, "
          f"{by_shared} by shared memory)")
    for number, line in enumerate(ir.splitlines(), 1):
        op = re.sub(r"^\s*(%[\w:#]+ = )?", "", line)
        if op.startswith(SHOWN):
            depth = (len(line) - len(line.lstrip())) // 2 - 2
            print(f"{number:5d} {'  ' * depth}{op.split(' loc(')[0][:110]}")
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(ir)


if __name__ == "__main__":
    main()
