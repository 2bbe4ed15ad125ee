"""Experiments: the lecture's comparisons as commands that write results (the demo, the three paradigms, GLUE)."""
