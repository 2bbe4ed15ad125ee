"""`lmlab lab`: scale and emergence, measured (issue 15). Each experiment is a command that runs in at most 15
minutes on 2 CPU cores (`--quick`: under 2 minutes), writes JSON, a markdown table and a plot through
lmlab.util.write_report, and gives an automatic verdict on whether the phenomenon appeared:

1. scaling law      L(N) = E + A / N^alpha over GPTs of 6 sizes, and an IsoFLOP view (`lmlab lab scaling`)
2. emergence        exact match against a per-token metric across the same sizes (`lmlab lab emergence`)
3. induction heads  a 2-layer attention-only model against a 1-layer control (`lmlab lab induction`)
4. grokking         modular addition: train accuracy long before test accuracy (`lmlab lab grokking`)
5. real models      zero- against few-shot for every pulled model, beside experiment 3 (`lmlab lab shots`)
"""
