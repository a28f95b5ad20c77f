"""Optimizers: centripetal SGD (C-SGD) and global sparse momentum (GSM)."""
