"""Quality evaluation: perplexity over held-out text and greedy agreement with a reference model."""
