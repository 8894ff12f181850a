"""Triton kernels and their thin validating launchers, installed as `autoglm_fast.kernels`.

Each fused op sits beside the eager reference it is tested against (see autoglm_fast/reference/).
"""
