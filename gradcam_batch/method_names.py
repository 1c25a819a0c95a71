"""The names cam.method takes, by how the engine computes them (methods.py holds the formulas).
Kept apart from the formulas so the configuration, and with it every mistake on the command
line, is checked without importing torch."""

# the channel-weighted formulas: the Triton kernel implements exactly these
METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise")
# PyTorch only (methods.py, on any device)
EIGEN_METHODS = ("eigencam", "eigengradcam", "kpcacam")
EXTRA_METHODS = EIGEN_METHODS + ("fem",)
# the Grad-CAM formula on gradients the engine prepares (see methods.py's docstring)
PERTURBATION_METHODS = ("scorecam", "ablationcam")
PREPARED_METHODS = ("finercam", "shapleycam", "cam") + PERTURBATION_METHODS
# the maps do not depend on the target: the engine runs no backward, K targets share one map
GRADIENT_FREE = ("eigencam", "kpcacam", "fem")
ALL_METHODS = METHODS + EXTRA_METHODS + PREPARED_METHODS
