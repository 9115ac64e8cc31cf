"""PyTorch side of aitune."""
