"""GLM-4.1V: the released AutoGLM-Phone-9B checkpoint (see config.py)."""
