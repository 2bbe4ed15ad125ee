"""Training: the one loop (`fit`) and its pieces (schedule, metrics, distributed setup, the run wrapper), and the
objectives it trains: pretraining, classification fine-tuning, instruction tuning and DPO."""
