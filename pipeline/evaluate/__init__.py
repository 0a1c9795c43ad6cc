"""Evaluation: metrics, the instance protocol against original annotations, figures, the report, the
results explorer and the run summary."""
