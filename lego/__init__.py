"""LEGO: layered Transformer LMs with confidence-routed early exit (ASHEM)."""
