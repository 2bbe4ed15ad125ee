"""Data: corpora as token files (`lmlab prepare`), their sources and tokenizers, the embedded Shakespeare corpus, and
the prompt formats and JSON rows that training and evaluation share."""
