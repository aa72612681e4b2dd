"""Data: builders with sensitive-group labels, the batch pipeline, lighting perturbations."""
