"""`lmlab lab`: scale and emergence, measured (issue 15). Each experiment is a command that runs in at most 15
minutes on 2 CPU cores (`--quick`: under 2 minutes), writes JSON, a markdown table and a plot through
lmlab.util.write_report, and ends in an automatic verdict on whether the phenomenon appeared.

    scaling      lmlab lab scaling     L(N) = E + A / N^alpha over GPT sizes, and the IsoFLOP view
    emergence    lmlab lab emergence   multi-digit addition: exact match against per-token metrics vs size
    induction    lmlab lab induction   the induction-head phase change, 2 layers against 1
    grokking     lmlab lab grokking    modular addition: train accuracy long before test accuracy
    shots        lmlab lab shots       real models, zero- against few-shot
"""
