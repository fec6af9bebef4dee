"""Thin typer commands; the behaviour lives in the packages they call."""
