"""Integrations with diffusers (imported lazily: the core never imports diffusers at import time)."""
