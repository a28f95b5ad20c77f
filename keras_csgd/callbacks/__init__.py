"""Training callbacks: ASFP and linear filter ensembles."""
