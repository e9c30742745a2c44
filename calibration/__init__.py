"""Commands that run the pipeline to fit a model from training photos (never references).

``calibration.score`` fits the local score (``copydet calibrate``), ``calibration.fusion``
the fusion model (``copydet calibrate-fusion``). They sit above ``pipeline``: no stage
imports them.
"""
