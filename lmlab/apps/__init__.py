"""Applications of language models built from lmlab's parts (retrieval-augmented generation)."""
