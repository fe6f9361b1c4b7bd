"""Synthetic, realistic input data for load tests, demos and end-to-end checks (see :mod:`loadgen.generate`)."""
