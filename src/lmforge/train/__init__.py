"""Trainer loop, backends, checkpoints, callbacks and job control."""
