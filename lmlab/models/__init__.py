"""Models: the one Transformer (GPT-2, Llama, BERT by config switches), the from-scratch baselines, Hugging Face and
GGUF formats, chat templates, PEFT methods, the run folder (checkpoints), and the registry that loads any of them."""
