"""Everything that touches torch.distributed (methods never import it)."""
