"""Mask design for a new lensless camera (``nsdd-train design-mask``).

propagation.py  mask → PSF: angular-spectrum Fresnel propagation, geometric-shadow fast path, colour
fabrication.py  minimum feature rule (exact check and repair), fabrication filter + projection, fill, LCD
patterns.py     MURA, MLS (random binary: nsdd_edge.psf_sim.random_binary_mask)
systems.py      encoders (relaxed teacher, binary / LCD student, fixed), Wiener + refinement decoder,
                transfer losses
design.py       settings, the designs, training, scoring, exact constraint checks
analysis.py     forward matrix of the crop model, condition number, Gram coherence, MTF
printing.py     printable PNG (physical pitch) and SVG of the openings
report.py       figure and Markdown report; cli.py the command
"""
