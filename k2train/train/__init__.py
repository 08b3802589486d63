"""The training loop and what it reports: the loop itself (`loop`), step statistics (`stats`), the
metrics log and its summary and plots (`metrics`, `summary`, `plots`), and model FLOPs per token for
MFU (`flops`)."""
