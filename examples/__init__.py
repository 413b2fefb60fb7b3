"""Runnable examples for eventbus; run them from the repository root.

``python -m examples.order_service demo`` (or ``make example``) is the place to start.
"""
