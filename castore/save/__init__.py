"""Saving: capture -> pipeline -> commit (``saver``), background saves, writer sessions."""
