"""Workstation side of nsdd-edge: lensless physics, solvers, the DDNM+ teacher and NSDD distillation."""
