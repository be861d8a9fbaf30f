"""Integrations of diffllama with other libraries: :mod:`diffllama.integrations.transformers`."""
