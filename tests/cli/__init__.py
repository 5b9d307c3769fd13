"""The README commands run as processes."""
