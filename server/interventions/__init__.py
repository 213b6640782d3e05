"""Per-request interventions on the model's neurons: SAE steering, steering vectors, EigenShift, memorization pruning."""
