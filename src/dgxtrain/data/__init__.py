"""Where samples come from: the global sample order and the synthetic data."""
