"""The container images, run as an operator runs them."""
