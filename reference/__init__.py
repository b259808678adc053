"""Pure-PyTorch reference for allmem_ops: the oracle ops and the AllMem model (float64-capable)."""
