"""Generation: the rollout record and engine protocol, the transformers engine and sampler, the CPU decoding fast
path, chat backends, and vLLM."""
