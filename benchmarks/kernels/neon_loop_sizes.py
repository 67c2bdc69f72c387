"""Instructions per weight block in the NEON matmul's inner loops, counted in the compiled code.

There is no ARM machine here, so benchmarks/neon_estimate.md estimates speed from what the
compiler emits: this script cross-compiles rz_kernels/cpu/qmatmul_neon.cc as each aarch64 variant
(rz_kernels.build.VARIANTS) builds it, disassembles it, and for each weight type finds the innermost
loop that holds a tile's integer dots (sdot or smmla), reporting its instructions per block and
per weight row-block (one weight row's 32 weights against one activation row).

    python benchmarks/kernels/neon_loop_sizes.py        # needs aarch64-linux-gnu-g++ and -objdump
"""

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import jax

from rz_kernels.build import COMMON_FLAGS, Variant, variants_for

SOURCE = Path(__file__).resolve().parents[2] / "rz_kernels" / "cpu" / "qmatmul_neon.cc"
# Per type: the weight view's name in the symbols, and whether it is a K-quant. One pass of the
# innermost tile loop covers 4 weight row-blocks (32 weights of one row against one activation
# row), 8 times that for K-quants (a super-block):
#   dotprod, one activation row: 4 weight rows x 1 block, or x 8 sub-blocks;
#   i8mm, two activation rows:   2 weight rows x 2 activation rows x 1 block, or x 8 sub-blocks.
TYPES = {
    "Q4_0": ("NibbleW<false, false>", False),
    "Q4_1": ("NibbleW<true, false>", False),
    "Q5_0": ("NibbleW<false, true>", False),
    "Q5_1": ("NibbleW<true, true>", False),
    "Q8_0": ("Q8_0W", False),
    "Q4_K": ("QK_W<false>", True),
    "Q5_K": ("QK_W<true>", True),
    "Q6_K": ("Q6_KW", True),
}
DOTS_PER_PASS = {  # (variant, K-quant) -> integer dot instructions in one pass (4 weight row-blocks, x 8 for K-quants)
    ("neon_dotprod", False): 8,
    ("neon_dotprod", True): 64,
    ("neon_i8mm", False): 4,
    ("neon_i8mm", True): 32,
}


def disassemble(variant: Variant, workdir: Path) -> str:
    obj = workdir / f"{variant.name}.o"
    flags = [f for f in COMMON_FLAGS + variant.flags if f != "-shared"]
    subprocess.run(["aarch64-linux-gnu-g++", *flags, f"-I{jax.ffi.include_dir()}", "-c", str(SOURCE), "-o", str(obj)], check=True, capture_output=True)
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", "-C", str(obj)], check=True, capture_output=True, text=True).stdout


def innermost_loop(disassembly: str, weight_view: str, dots: int) -> list[str] | None:
    """The shortest backward-branch loop, in a function instantiated for weight_view, with `dots` sdot/smmla."""
    best = None
    for function in re.split(r"\n(?=[0-9a-f]+ <)", disassembly):
        header = re.match(r"[0-9a-f]+ <(.*)>:", function)
        if not header or f"make_part<(anonymous namespace)::{weight_view}" not in header.group(1):
            continue
        code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in re.finditer(r"\n[ \t]+([0-9a-f]+):[ \t]+(\S+)[ \t]*([^\n]*)", function)]
        index = {address: i for i, (address, _, _) in enumerate(code)}
        for i, (address, op, args) in enumerate(code):
            target = re.search(r"\b([0-9a-f]+) <", args)
            if re.match(r"(b|cb|tb)", op) and target and int(target.group(1), 16) in index and int(target.group(1), 16) <= address:
                body = [o for _, o, _ in code[index[int(target.group(1), 16)] : i + 1]]
                if sum(o in ("sdot", "smmla") for o in body) == dots and (best is None or len(body) < len(best)):
                    best = body
    return best


def main() -> None:
    print("| type | variant | instructions per pass | row-blocks per pass | per row-block | loads | moves, spills |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in reversed(variants_for("aarch64")):
            disassembly = disassemble(variant, Path(tmp))
            for name, (view, k_quant) in TYPES.items():
                dots = DOTS_PER_PASS[(variant.name, k_quant)]
                body = innermost_loop(disassembly, view, dots)
                if body is None:
                    print(f"| {name} | {variant.name} | (loop not found) | | | | |")
                    continue
                row_blocks = 4 * (8 if k_quant else 1)
                ops = collections.Counter(body)
                loads = sum(n for o, n in ops.items() if o.startswith("ld"))
                moves = ops["mov"] + ops["str"] + ops["stp"]
                print(f"| {name} | {variant.name} | {len(body)} | {row_blocks} | {len(body) / row_blocks:.1f} | {loads} | {moves} |")


if __name__ == "__main__":
    main()
