"""Certification of trained models: clean / PGD / certified accuracy per norm and for their union,
randomized smoothing and robustness to geometric transforms.

    cure_fast.certification.evaluate    the certification cascade (IBP, CROWN-IBP, CROWN, α-CROWN)
    cure_fast.certification.certify     ``cure-fast certify``: a trained run to its reports
    cure_fast.certification.smoothing   randomized smoothing (Cohen et al.), test-time adaptive BatchNorm
    cure_fast.certification.geometric   worst case over rotations, shifts, scalings, brightness, contrast

The submodules are imported on their own; this package imports none of them.
"""
