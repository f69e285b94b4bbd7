"""DeepSeek-V4 math in plain torch: config, forward pass, checkpoint loader, tiny checkpoints, tokenizer."""
