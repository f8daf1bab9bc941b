"""Model artifacts: safe archives, freezing, evaluation, the acceptance gate and the edge formats."""
