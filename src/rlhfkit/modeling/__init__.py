"""Models: loading and saving (precision, LoRA, checkpoints), attention kernels, log-prob kernels and forward
passes, the policy with its value head, and reward-model scoring."""
