"""Print the optimized-HLO text of the fusions a profile names (what is that `loop_convert_fusion_45`?).

    XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" \
        python3 benchmarks/profile_decode.py ...
    python3 benchmarks/hlo_fusions.py DIR loop_convert_fusion_45 loop_reduce_fusion_31 ...

For each name: the instruction that calls the fusion (operand and result shapes) in the largest
`*after_optimizations.txt` module of DIR, then the fused computation's body. A name given as a
prefix ending in '*' matches every instruction starting with it.
"""
from __future__ import annotations

import glob
import os
import re
import sys


def main(argv):
    d, names = argv[0], argv[1:]
    files = sorted(glob.glob(os.path.join(d, "*after_optimizations.txt")), key=os.path.getsize)
    if not files:
        sys.exit(f"no *after_optimizations.txt under {d}")
    text = open(files[-1]).read()
    print(f"# {os.path.basename(files[-1])} ({len(text)} chars)")
    comps = {}
    for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", text, re.M | re.S):
        comps[m.group(1)] = m.group(2)
    for name in names:
        pat = re.escape(name[:-1]) + r"[\w.]*" if name.endswith("*") else re.escape(name)
        seen = 0
        for m in re.finditer(r"^\s*(?:ROOT )?%?(" + pat + r") = ([^\n]*)$", text, re.M):
            seen += 1
            if seen > 3:
                break
            line = m.group(2)
            print(f"\n## {m.group(1)} = {line[:600]}")
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if called and called.group(1) in comps:
                print(comps[called.group(1)][:3000])
        if not seen:
            print(f"\n## {name}: not found")


if __name__ == "__main__":
    main(sys.argv[1:])
