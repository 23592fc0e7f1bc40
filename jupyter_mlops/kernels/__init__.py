"""Kernels: pools of pre-started kernels (later: provisioners, GPU allocation, kernelspecs)."""
