"""Offline calibration: activation statistics, thresholds, evaluation and the quality report."""
