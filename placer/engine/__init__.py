"""Real multi-device execution of placed graphs (torch.distributed workers)."""
