"""Training machinery: the one loop (``trainer``), the data order, optimizer and schedule,
checkpoints, the non-finite guard, metrics, the accelerator and engines, and the output-dir rules."""
