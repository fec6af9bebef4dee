"""Execution backends behind the one trainer loop: single device, DDP, pipeline."""
