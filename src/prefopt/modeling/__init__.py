"""Model compute: loading, fused activations, attention masks, the chunked LM head, log-probs,
LoRA through PEFT, and the reward model's scalar head."""
