"""Curvature representations as blocks with one protocol, and the solvers they use."""
