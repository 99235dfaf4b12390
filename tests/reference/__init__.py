"""Independent float64 NumPy/SciPy reference implementations of the low-rank optimizers (test oracle only)."""
